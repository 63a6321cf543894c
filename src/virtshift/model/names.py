"""Names that become file names: the rule for snapshot names, in one place.

A snapshot's name names its metadata file, so it must be a safe file name:
libvirt's rules (no '/', no leading '.') plus what a file system needs (not
empty, no NUL, valid UTF-8, at most 200 characters and 200 bytes) and no
control characters (a tab or escape sequence in a file name and in listings
helps nobody).  Pure.
"""

from __future__ import annotations

from typing import Final

from virtshift.errors import ErrorCode, ErrorDomain, VirtError

__all__ = ["MAX_NAME_LENGTH", "check_snapshot_name"]

#: Longest accepted snapshot name, in characters and in UTF-8 bytes.  With the
#: ``.xml`` suffix and the temporary-file decoration of ``write_atomic`` the file
#: names stay well below the usual 255-byte limit of file systems.
MAX_NAME_LENGTH: Final[int] = 200

_SUFFIX: Final[str] = ".xml"


def check_snapshot_name(name: str) -> None:
    """Refuse a name that is not safe as a file name in the store.

    :raise VirtError: XML_DETAIL "invalid snapshot name 'X': name can't ..."
        (libvirt's wording for '/' and a leading '.').
    """
    shown = name.replace("\0", "\\0")
    if not name:
        reason = "name can't be empty"
    elif "/" in name:
        reason = "name can't contain '/'"
    elif "\0" in name:
        reason = "name can't contain a NUL character"
    elif name.startswith("."):
        reason = "name can't start with '.'"
    elif any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        reason = "name can't contain control characters"
    elif len(name) > MAX_NAME_LENGTH:
        reason = f"name can't be longer than {MAX_NAME_LENGTH} characters"
    else:
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            reason = "name must be valid UTF-8"
        else:
            if len(encoded) <= MAX_NAME_LENGTH:
                return
            reason = f"name can't be longer than {MAX_NAME_LENGTH} bytes"
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
    raise VirtError(
        ErrorCode.XML_DETAIL,
        f"invalid snapshot name '{shown}': {reason}",
        domain=ErrorDomain.DOMAIN_SNAPSHOT,
    )
