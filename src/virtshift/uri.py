"""Connection URIs: which driver root a URI names.

* ``qemu:///embed?root=DIR``: everything under DIR (absolute), as libvirt's
  embedded QEMU driver does;
* ``qemu:///session`` (the default): a per-user root,
  ``$XDG_DATA_HOME/virtshift/session`` (``~/.local/share/virtshift/session``);
* no URI: ``$VIRTSHIFT_DEFAULT_URI`` if set, else ``qemu:///session``.

``qemu:///system`` and remote URIs are refused: virtshift has no daemon.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from virtshift.errors import ErrorCode, VirtError

__all__ = ["DEFAULT_URI", "resolve_uri"]

DEFAULT_URI = "qemu:///session"


def _session_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "virtshift" / "session"


def resolve_uri(uri: str | None) -> tuple[str, Path]:
    """The canonical URI and the driver root it names.

    :raise VirtError: NO_CONNECT for URIs virtshift has no driver for;
        INVALID_ARG for an embed URI without an absolute root.
    """
    if not uri:
        uri = os.environ.get("VIRTSHIFT_DEFAULT_URI") or DEFAULT_URI
    parts = urlsplit(uri)
    if parts.scheme != "qemu" or parts.netloc not in ("", "localhost"):
        raise VirtError(ErrorCode.NO_CONNECT, uri)
    if parts.path == "/session":
        return uri, _session_root()
    if parts.path == "/embed":
        roots = parse_qs(parts.query).get("root", [])
        if len(roots) != 1 or not roots[0]:
            raise VirtError(ErrorCode.INVALID_ARG, f"URI '{uri}' must give one root=DIR")
        root = roots[0]
        if not os.path.isabs(root):
            raise VirtError(
                ErrorCode.INVALID_ARG, f"embedded driver root path '{root}' must be absolute"
            )
        return uri, Path(os.path.normpath(root))
    raise VirtError(
        ErrorCode.NO_CONNECT,
        f"{uri} (virtshift has no daemon: use qemu:///session or qemu:///embed?root=DIR)",
    )
