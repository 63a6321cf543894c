"""Live storage migration: move a running domain's disks to another storage
domain in one crash-safe command (see :mod:`virtshift.migrate.engine`).

Python entry points, for programs::

    from virtshift.migrate import migrate_storage, resume_storage_migration
    journal = migrate_storage(dom, "/mnt/sd2", merge=True)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "abort_storage_migration",
    "migrate_storage",
    "resume_storage_migration",
    "storage_migration_status",
]


def migrate_storage(dom: Any, dest: str, **options: Any) -> Any:
    """Move ``dom``'s disks to ``dest``; options as :meth:`Migration.start`.

    :return: the final journal (:class:`virtshift.migrate.journal.Journal`).
    :raise virtshift.libvirt.libvirtError: on failure; the journal then says
        where the move stopped and which storage domain is consistent.
    """
    from virtshift.libvirt import _api
    from virtshift.migrate.engine import Migration

    progress = options.pop("progress", None)
    return _api(Migration(dom, progress).start)(dest, **options)


def resume_storage_migration(dom: Any, progress: Any = None) -> Any:
    """Finish an interrupted migration of ``dom``."""
    from virtshift.libvirt import _api
    from virtshift.migrate.engine import Migration

    return _api(Migration(dom, progress).resume)()


def abort_storage_migration(dom: Any) -> Any:
    """Return every disk of ``dom`` that has not pivoted to its source."""
    from virtshift.libvirt import _api
    from virtshift.migrate.engine import Migration

    return _api(Migration(dom).abort)()


def storage_migration_status(dom: Any) -> Any:
    """The journal of ``dom``'s current or last migration, or None."""
    from virtshift.libvirt import _api
    from virtshift.migrate.engine import Migration

    return _api(Migration(dom).status)()
