"""Loggers that import :mod:`logging` only when something is logged.

``logging`` (with ``traceback``, ``string`` and ``textwrap``) costs about 6 ms
to import; ``virtshift list`` and other calls that log nothing do not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    import logging

__all__ = ["DEBUG", "get_logger"]

#: ``logging.DEBUG``.
DEBUG: Final = 10


class _Deferred:
    """Stands for ``logging.getLogger(name)`` until first used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import logging

        logger = logging.getLogger(self._name)
        # later lookups of this attribute skip __getattr__
        value = getattr(logger, attr)
        setattr(self, attr, value)
        return value


def get_logger(name: str) -> logging.Logger:
    """The logger ``name``, created on first use."""
    return cast("logging.Logger", _Deferred(name))
