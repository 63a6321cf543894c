"""libvirt ``<domain>`` XML <-> :class:`~virtshift.model.domain.Domain`.

* :func:`parse_domain` reads a definition through the hardened parser
  (:func:`virtshift.xml.safe.parse_document`), builds the model and checks it
  with :func:`validate_domain`.  Every object keeps the element it came from in
  ``tree``; a missing ``<uuid>`` is generated and written into that tree.
* :func:`format_domain` writes the model back.  The document is the store: the
  output starts from a copy of ``Domain.tree`` and only what the model changed
  is rewritten, so unknown elements, ``<metadata>`` namespaces, attribute and
  element order survive.  A domain built in code (``tree=None``) gets a new
  document in libvirt's element order.  Text is written like libvirt writes it
  (two-space indentation, single-quoted attributes, trailing newline).

Live and inactive forms
-----------------------
The live form (``inactive=False``) writes ``<domain id=>``, disk and channel
``<alias>``, ``index=`` attributes and ``<mirror>``.  The inactive form drops
the id, the mirrors, aliases other than user aliases (``ua-...``) and every
``index=`` that was not already in the parsed document with the same value
(libvirt keeps the indexes of a configured chain in the inactive form too;
so indexes read back from a saved live document also stay).  Both forms
write the backing chain the model holds; a caller that keeps a separate
persistent definition formats that one for the inactive form.

When a disk's chain (or a mirror) differs from what its element says, the
``<source>`` / ``<backingStore>`` / ``<format>`` elements are regenerated from
the model.  Each regenerated layer starts from the element of the same image
(same path, or same protocol and volume name) found in the layer's own
``tree`` or in the disk's old chain or old mirror, so children virtshift does
not model (``<seclabel>``, ``<host>``, ``<encryption>``, ``<privateData>``...)
follow their image; an image with no old element gets fresh elements.  A
regenerated ``type='file'`` mirror also gets libvirt's old-style ``file=`` and
``format=`` attributes, as libvirt writes them.

This module does no IO: it does not check that images exist, talk to QEMU or
choose file names.  It validates only what :func:`validate_domain` lists; the
schema (``domain.rng``) is not applied.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
import uuid as uuidlib
from collections.abc import Iterable, Sequence
from typing import Final

from lxml import etree

from virtshift.errors import ErrorCode, ErrorDomain, VirtError
from virtshift.model.domain import Channel, Disk, Domain, Mirror, StorageSource
from virtshift.xml.safe import parse_document, serialize_document

__all__ = [
    "domain_element",
    "format_domain",
    "parse_disk_source",
    "parse_domain",
    "validate_domain",
]

_WHAT: Final = "domain definition"

#: Longest accepted domain name (it becomes a file name of the store).
MAX_NAME_LENGTH: Final = 200

# Child element order as libvirt writes it; used only to place an element
# that the document does not have yet.
_DOMAIN_ORDER: Final = (
    "name", "uuid", "genid", "title", "description", "metadata", "maxMemory", "memory",
    "currentMemory", "blkiotune", "memtune", "memoryBacking", "vcpu", "vcpus", "iothreads",
    "iothreadids", "defaultiothread", "cputune", "numatune", "resource", "sysinfo",
    "bootloader", "bootloader_args", "os", "idmap", "features", "cpu", "clock",
    "on_poweroff", "on_reboot", "on_crash", "on_lockfailure", "pm", "perf", "devices",
    "seclabel", "keywrap", "launchSecurity",
)  # fmt: skip
_OS_ORDER: Final = (
    "type", "firmware", "loader", "nvram", "varstore", "kernel", "initrd", "cmdline", "shim",
    "dtb", "acpi", "boot", "bootmenu", "smbios", "bios",
)  # fmt: skip
_DEVICES_ORDER: Final = (
    "emulator", "disk", "controller", "lease", "filesystem", "interface", "smartcard",
    "serial", "parallel", "console", "channel", "input", "tpm", "graphics", "sound", "audio",
    "video", "hostdev", "redirdev", "redirfilter", "hub", "watchdog", "memballoon", "rng",
    "panic", "shmem", "memory", "iommu", "vsock", "crypto", "pstore",
)  # fmt: skip
_DISK_ORDER: Final = (
    "driver", "auth", "source", "backingStore", "backenddomain", "geometry", "blockio",
    "mirror", "target", "iotune", "throttlefilters", "readonly", "shareable", "transient",
    "serial", "wwn", "vendor", "product", "encryption", "boot", "alias", "address",
)  # fmt: skip
_LAYER_ORDER: Final = ("format", "source", "backingStore")
_MIRROR_ATTR_ORDER: Final = ("type", "file", "format", "job", "ready")
_CHANNEL_ORDER: Final = ("source", "protocol", "log", "target", "alias", "address")

#: Which ``<source>`` attribute holds the path, per storage type.
_PATH_ATTR: Final = {"file": "file", "block": "dev", "dir": "dir"}
#: Storage types whose path must be absolute.
_LOCAL_TYPES: Final = frozenset({"file", "block"})

_DEFAULT_DISK_TYPE: Final = "file"
_DEFAULT_DEVICE: Final = "disk"
_DEFAULT_LAYER_TYPE: Final = "file"
_DEFAULT_MIRROR_JOB: Final = "copy"
_DEFAULT_CHANNEL_TYPE: Final = "pty"
_DEFAULT_OS_TYPE: Final = "hvm"

_DIGITS_RE: Final = re.compile(r"\s*[0-9]+\s*")
_UNIT_POWERS: Final = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_MAX_BYTES: Final = 2**64 - 1
#: Longest accepted decimal number (2**64 has 20 digits).
_MAX_DIGITS: Final = 20

_IdentityT = tuple[str | None, str | None, str | None]


def _xml_error(detail: str) -> VirtError:
    return VirtError(ErrorCode.XML_ERROR, detail, domain=ErrorDomain.CONF)


def _show(value: str) -> str:
    """``value`` fit for a message: control characters escaped."""
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


# --------------------------------------------------------------------------
# Parsing: element -> model (no validation beyond value syntax)


def _uint(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if not _DIGITS_RE.fullmatch(text):
        raise _xml_error(f"invalid {what} '{_show(text)}'")
    if len(text.strip()) > _MAX_DIGITS:
        raise _xml_error(f"{what} '{_show(text.strip()[:24])}...' is too large")
    return int(text)


def _scale_to_kib(text: str | None, unit: str | None) -> int:
    """A libvirt scaled integer (default unit KiB) in KiB, rounded up."""
    value = _uint(text if text is not None else "", "memory size")
    assert value is not None
    name = unit if unit else "KiB"
    lowered = name.lower()
    if lowered in ("b", "byte", "bytes"):
        factor = 1
    else:
        power = _UNIT_POWERS.get(lowered[:1])
        rest = lowered[1:]
        if power is None or rest not in ("", "ib", "b"):
            raise _xml_error(f"unknown memory unit '{_show(name)}'")
        factor = (1000 if rest == "b" else 1024) ** power
    total = value * factor
    if total > _MAX_BYTES:
        raise VirtError(
            ErrorCode.OVERFLOW,
            f"memory size {value} {_show(name)} is too large",
            domain=ErrorDomain.CONF,
        )
    return -(-total // 1024)


def _normalize_uuid(text: str) -> str:
    """The canonical (lower case, hyphenated) form of a libvirt UUID string."""
    compact = "".join(text.split()).replace("-", "")
    if len(compact) != 32 or not all(c in "0123456789abcdefABCDEF" for c in compact):
        raise _xml_error(f"malformed uuid element '{_show(text)}'")
    return str(uuidlib.UUID(hex=compact))


def _is_end_marker(el: etree._Element) -> bool:
    """An empty ``<backingStore/>``: the chain ends above it."""
    return not el.attrib and not any(isinstance(c.tag, str) for c in el)


def _source_path(src: etree._Element | None, typ: str) -> str | None:
    attr = _PATH_ATTR.get(typ)
    if src is None or attr is None:
        return None
    return src.get(attr)


def _network(src: etree._Element | None, typ: str) -> tuple[str | None, str | None]:
    if src is None or typ != "network":
        return None, None
    return src.get("protocol"), src.get("name")


def _chain_below(parent: etree._Element, nodes: bool = False) -> tuple[StorageSource | None, bool]:
    """The layer under ``parent`` (a disk, mirror or backingStore) and the end flag."""
    bs = parent.find("backingStore")
    if bs is None:
        return None, False
    if _is_end_marker(bs):
        return None, True
    return _layer_from_backing(bs, nodes), False


def _node_name(index: int | None, nodes: bool) -> str | None:
    """QEMU's node name of an indexed layer (only in status files, ``nodes``)."""
    return f"libvirt-{index}-format" if nodes and index is not None else None


def _layer_from_backing(bs: etree._Element, nodes: bool = False) -> StorageSource:
    typ = bs.get("type", _DEFAULT_LAYER_TYPE)
    src = bs.find("source")
    fmt = bs.find("format")
    protocol, name = _network(src, typ)
    backing, end = _chain_below(bs, nodes)
    index = _uint(bs.get("index"), "backing store index")
    layer = StorageSource(
        type=typ,
        path=_source_path(src, typ),
        format=fmt.get("type") if fmt is not None else None,
        protocol=protocol,
        name=name,
        index=index,
        backing=backing,
        backing_end=end,
        node_name=_node_name(index, nodes),
        tree=bs,
    )
    if nodes:  # a status document: formatted by virtshift (see StorageSource.as_parsed)
        object.__setattr__(layer, "as_parsed", True)
    return layer


def _top_layer(
    owner: etree._Element, typ: str, fmt: str | None, nodes: bool = False
) -> StorageSource:
    src = owner.find("source")
    protocol, name = _network(src, typ)
    backing, end = _chain_below(owner, nodes)
    index = _uint(src.get("index"), "disk source index") if src is not None else None
    return StorageSource(
        type=typ,
        path=_source_path(src, typ),
        format=fmt,
        protocol=protocol,
        name=name,
        index=index,
        backing=backing,
        backing_end=end,
        node_name=_node_name(index, nodes),
        tree=src,
    )


def _mirror_from_element(el: etree._Element, nodes: bool = False) -> Mirror:
    typ = el.get("type", _DEFAULT_LAYER_TYPE)
    fmt_el = el.find("format")
    fmt = fmt_el.get("type") if fmt_el is not None else el.get("format")
    source = _top_layer(el, typ, fmt, nodes)
    if el.find("source") is None and typ in _PATH_ATTR:
        # Old form: <mirror file='...' format='...'/>.
        source = dataclasses.replace(source, path=el.get("file"))
    return Mirror(
        job=el.get("job", _DEFAULT_MIRROR_JOB), ready=el.get("ready"), source=source, tree=el
    )


def _disk_from_element(el: etree._Element, nodes: bool = False) -> Disk:
    """The disk of ``el``; ``nodes``: with the node names of a status file."""
    typ = el.get("type", _DEFAULT_DISK_TYPE)
    driver = el.find("driver")
    target = el.find("target")
    alias = el.find("alias")
    mirror = el.find("mirror")
    serial = el.find("serial")
    return Disk(
        type=typ,
        device=el.get("device", _DEFAULT_DEVICE),
        driver_name=driver.get("name") if driver is not None else None,
        target=(target.get("dev") or "") if target is not None else "",
        bus=target.get("bus") if target is not None else None,
        source=_top_layer(el, typ, driver.get("type") if driver is not None else None, nodes),
        readonly=el.find("readonly") is not None,
        serial=(serial.text or None) if serial is not None else None,
        snapshot=el.get("snapshot"),
        alias=alias.get("name") if alias is not None else None,
        mirror=_mirror_from_element(mirror, nodes) if mirror is not None else None,
        tree=el,
    )


def _channel_from_element(el: etree._Element) -> Channel:
    src = el.find("source")
    target = el.find("target")
    alias = el.find("alias")
    return Channel(
        type=el.get("type", _DEFAULT_CHANNEL_TYPE),
        path=src.get("path") if src is not None else None,
        target_type=target.get("type") if target is not None else None,
        target_name=target.get("name") if target is not None else None,
        alias=alias.get("name") if alias is not None else None,
        tree=el,
    )


def _stripped(text: str | None) -> str | None:
    if text is None:
        return None
    return text.strip() or None


def _head_from_element(root: etree._Element) -> Domain:
    """The domain's own fields (type, name, uuid, id, memory, vcpu, os, emulator),
    without its disks and channels."""
    typ = root.get("type")
    if typ is None:
        raise _xml_error("missing domain type attribute")
    uuid_text = _stripped(root.findtext("uuid"))
    memory = root.find("memory")
    vcpu = _uint(_stripped(root.findtext("vcpu")), "vcpu count")
    os_type = root.find("os/type")
    return Domain(
        type=typ,
        name=root.findtext("name") or "",
        uuid=_normalize_uuid(uuid_text) if uuid_text else "",
        id=_uint(root.get("id"), "domain id"),
        memory_kib=_scale_to_kib(memory.text, memory.get("unit")) if memory is not None else 0,
        vcpu=vcpu if vcpu is not None else 1,
        os_type=(_stripped(os_type.text) or _DEFAULT_OS_TYPE)
        if os_type is not None
        else _DEFAULT_OS_TYPE,
        arch=os_type.get("arch") if os_type is not None else None,
        machine=os_type.get("machine") if os_type is not None else None,
        emulator=_stripped(root.findtext("devices/emulator")),
        tree=root,
    )


def _domain_from_element(root: etree._Element, nodes: bool = False) -> Domain:
    head = _head_from_element(root)
    devices = root.find("devices")
    if devices is None:
        return head
    disks = tuple(_disk_from_element(d, nodes) for d in devices.findall("disk"))
    if nodes:
        # a status document's disks are formatted again soon (the next status,
        # a snapshot's domain): what each tree says is known now
        _remember_tree_disks(disks)
    return dataclasses.replace(
        head,
        disks=disks,
        channels=tuple(_channel_from_element(c) for c in devices.findall("channel")),
    )


def parse_domain(text: str | bytes) -> Domain:
    """Parse and validate a libvirt ``<domain>`` definition (live or inactive).

    :param text: the XML document; bytes must be UTF-8.
    :raise VirtError: ``XML_ERROR`` for unsafe or malformed XML and for the
        semantic errors of :func:`validate_domain`; ``OVERFLOW`` for a memory
        size beyond 2**64 bytes.
    :return: the model; a UUID is generated (and added to ``tree``) if absent.
    """
    root = parse_document(text, what=_WHAT, root_tag="domain")
    dom = _domain_from_element(root)
    if not dom.uuid:
        generated = str(uuidlib.uuid4())
        uuid_el = root.find("uuid")
        if uuid_el is None:
            uuid_el = etree.Element("uuid")
            _place(root, uuid_el, _DOMAIN_ORDER)
        uuid_el.text = generated
        dom = dataclasses.replace(dom, uuid=generated)
    validate_domain(dom)
    return dom


def domain_from_element(root: etree._Element, *, node_names: bool = False) -> Domain:
    """Like :func:`parse_domain`, for a ``<domain>`` element of a document that
    :func:`~virtshift.xml.safe.parse_document` already read (a status file's);
    the element becomes the model's ``tree`` and must hold a UUID.

    :param node_names: give every indexed layer (disks and mirrors) QEMU's
        node name ``libvirt-INDEX-format``, as a status file's domain has.
    :raise VirtError: as :func:`parse_domain`.
    """
    dom = _domain_from_element(root, node_names)
    if not dom.uuid:
        raise _xml_error("missing domain uuid")
    validate_domain(dom)
    return dom


# --------------------------------------------------------------------------
# Validation


def _describe(layer: StorageSource) -> str:
    if layer.path is not None:
        return layer.path
    if layer.name is not None:
        return f"{layer.protocol}:{layer.name}" if layer.protocol else layer.name
    return ""


def _check_name(name: str) -> None:
    if not name:
        raise _xml_error("domain name is missing")
    if "\x00" in name:
        raise _xml_error(f"domain name '{_show(name)}' must not contain NUL")
    if "/" in name:
        raise _xml_error(f"domain name '{_show(name)}' must not contain '/'")
    if name.startswith("."):
        raise _xml_error(f"domain name '{_show(name)}' must not start with '.'")
    if len(name) > MAX_NAME_LENGTH:
        raise _xml_error(
            f"domain name '{_show(name[:40])}...' is longer than {MAX_NAME_LENGTH} characters"
        )
    if not name.isprintable():
        raise _xml_error(f"domain name '{_show(name)}' must contain printable characters only")


def _check_chain(layer: StorageSource) -> None:
    for item in layer.chain():
        if item.type in _LOCAL_TYPES and item.path is not None and not item.path.startswith("/"):
            raise _xml_error(f"disk source path '{_show(item.path)}' must be absolute")


def validate_domain(dom: Domain) -> None:
    """Check what libvirt rejects at definition time (no file system access).

    * the name is present, at most 200 printable characters, has no ``/`` or
      NUL and does not start with ``.`` (it names files of the store);
    * the UUID, if set, is well formed;
    * every disk has a target dev and no two disks share one;
    * file and block paths of every disk layer, backing layer and mirror layer
      are absolute (other storage types are not checked).

    :param dom: the domain.
    :raise VirtError: ``XML_ERROR`` naming the offending value.
    """
    _check_name(dom.name)
    if dom.uuid:
        _normalize_uuid(dom.uuid)
    seen: dict[str, Disk] = {}
    for disk in dom.disks:
        if not disk.target:
            raise _xml_error(
                f"missing target information for disk source '{_show(_describe(disk.source))}'"
            )
        other = seen.get(disk.target)
        if other is not None:
            raise _xml_error(
                f"target '{_show(disk.target)}' duplicated for disk sources "
                f"'{_show(_describe(other.source))}' and '{_show(_describe(disk.source))}'"
            )
        seen[disk.target] = disk
        _check_chain(disk.source)
        if disk.mirror is not None:
            _check_chain(disk.mirror.source)


# --------------------------------------------------------------------------
# Formatting helpers


def _copy(el: etree._Element) -> etree._Element:
    """A copy of ``el`` and everything below it: what ``copy.deepcopy`` gives
    (lxml's ``__deepcopy__`` is its ``__copy__``), without the ``copy``
    module's per-call bookkeeping (formatting copies every disk's elements)."""
    copied: etree._Element = el.__copy__()  # type: ignore[attr-defined]
    return copied


def _set_attr(el: etree._Element, name: str, value: str | None) -> None:
    """Set (or with None remove) an attribute, leaving it untouched when equal."""
    if value is None:
        if name in el.attrib:
            del el.attrib[name]
        return
    if el.get(name) == value:
        return
    try:
        el.set(name, value)
    except ValueError as err:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"value '{_show(value)}' of attribute '{name}' cannot be written to XML",
            domain=ErrorDomain.CONF,
            cause=err,
        ) from err


def _set_text(el: etree._Element, value: str) -> None:
    if el.text == value:
        return
    try:
        el.text = value
    except ValueError as err:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"value '{_show(value)}' of <{el.tag}> cannot be written to XML",
            domain=ErrorDomain.CONF,
            cause=err,
        ) from err


def _sync_attr(el: etree._Element, name: str, value: str, default: str | None) -> None:
    """Write ``value`` unless the element already means it (explicitly or by default)."""
    if el.get(name, default) != value:
        _set_attr(el, name, value)


def _place(parent: etree._Element, child: etree._Element, order: Sequence[str]) -> None:
    """Insert ``child`` where ``order`` says, relative to the children present."""
    rank = order.index(child.tag) if child.tag in order else len(order)
    after: int | None = None
    before: int | None = None
    for pos, sibling in enumerate(parent):
        tag = sibling.tag
        if not isinstance(tag, str) or tag not in order:
            continue
        if order.index(tag) <= rank:
            after = pos
        elif before is None:
            before = pos
    if after is not None:
        parent.insert(after + 1, child)
    elif before is not None:
        parent.insert(before, child)
    elif rank == 0:
        parent.insert(0, child)
    else:
        parent.append(child)


def _child(parent: etree._Element, tag: str, order: Sequence[str]) -> etree._Element:
    """The first ``tag`` child, created in order when missing."""
    el = parent.find(tag)
    if el is None:
        el = etree.Element(tag)
        _place(parent, el, order)
    return el


def _remove_all(parent: etree._Element, tag: str) -> None:
    for el in parent.findall(tag):
        parent.remove(el)


def _fill_slots(
    parent: etree._Element, tag: str, new: Sequence[etree._Element], order: Sequence[str]
) -> None:
    """Put ``new`` where the ``tag`` children were (extra ones after the last)."""
    old = parent.findall(tag)
    last: etree._Element | None = None
    for pos, el in enumerate(new):
        if pos < len(old):
            parent.replace(old[pos], el)
        elif last is not None:
            parent.insert(parent.index(last) + 1, el)
        else:
            _place(parent, el, order)
        last = el
    for extra in old[len(new) :]:
        parent.remove(extra)


def _replace_or_place(
    parent: etree._Element,
    old: etree._Element | None,
    new: etree._Element | None,
    order: Sequence[str],
) -> None:
    if old is not None and new is not None:
        parent.replace(old, new)
    elif old is not None:
        parent.remove(old)
    elif new is not None:
        _place(parent, new, order)


def _layer_key(layer: StorageSource | None) -> tuple[object, ...] | None:
    """What of a layer (and below) reaches the XML; ``tree`` and ``node_name`` do not."""
    if layer is None:
        return None
    return (
        layer.type,
        layer.path,
        layer.format,
        layer.protocol,
        layer.name,
        layer.index,
        layer.backing_end,
        _layer_key(layer.backing),
    )


def _mirror_key(mirror: Mirror) -> tuple[object, ...]:
    return (mirror.job, mirror.ready, _layer_key(mirror.source))


def _identity(layer: StorageSource) -> _IdentityT:
    return (layer.path, layer.protocol, layer.name)


def _element_identity(src: etree._Element) -> _IdentityT:
    path = src.get("file") or src.get("dev") or src.get("dir")
    return (path, src.get("protocol"), src.get("name"))


_NO_IDENTITY: Final[_IdentityT] = (None, None, None)


@dataclasses.dataclass(frozen=True, slots=True)
class _OldLayer:
    """An image's element in the document before formatting (a template)."""

    identity: _IdentityT
    source: etree._Element | None
    backing_store: etree._Element | None


def _old_layers(chains: Iterable[StorageSource]) -> list[_OldLayer]:
    out: list[_OldLayer] = []
    for top in chains:
        for layer in top.chain():
            tree: etree._Element | None = layer.tree
            if tree is None:
                continue
            if tree.tag == "backingStore":
                out.append(_OldLayer(_identity(layer), tree.find("source"), tree))
            else:
                out.append(_OldLayer(_identity(layer), tree, None))
    return out


def _templates(
    layer: StorageSource, old: Sequence[_OldLayer]
) -> tuple[etree._Element | None, etree._Element | None]:
    """``(backingStore, source)`` elements to start this layer from, or None."""
    ident = _identity(layer)
    own: etree._Element | None = layer.tree
    if own is not None:
        if own.tag == "backingStore":
            src = own.find("source")
            if (src is None and ident == _NO_IDENTITY) or (
                src is not None and _element_identity(src) == ident
            ):
                return own, src
        elif own.tag == "source" and _element_identity(own) == ident:
            return None, own
    if ident == _NO_IDENTITY:
        return None, None
    match: _OldLayer | None = None
    for item in old:
        if item.identity == ident and (match is None or match.backing_store is None):
            match = item
    if match is None:
        return None, None
    return match.backing_store, match.source


def _apply_index(el: etree._Element, index: int | None, *, inactive: bool) -> None:
    current = el.get("index")
    current_value = (
        int(current)
        if current is not None and _DIGITS_RE.fullmatch(current) and len(current) <= _MAX_DIGITS
        else None
    )
    if inactive:
        # Keep only an index the parsed document already had for this image.
        if current is not None and current_value != index:
            del el.attrib["index"]
        return
    if index is None:
        _set_attr(el, "index", None)
    elif current_value != index:
        _set_attr(el, "index", str(index))


def _apply_source_attrs(src: etree._Element, layer: StorageSource) -> None:
    path_attr = _PATH_ATTR.get(layer.type)
    if path_attr is not None:
        for other in ("file", "dev", "dir", "protocol", "name"):
            if other != path_attr:
                _set_attr(src, other, None)
        _set_attr(src, path_attr, layer.path)
    elif layer.type == "network":
        for other in ("file", "dev", "dir"):
            _set_attr(src, other, None)
        _set_attr(src, "protocol", layer.protocol)
        _set_attr(src, "name", layer.name)
    # Other storage types (volume, nvme, vhostuser...) are not modelled: their
    # attributes stay as the template has them.


def _has_source_data(layer: StorageSource) -> bool:
    return layer.path is not None or layer.protocol is not None or layer.name is not None


def _source_element(
    layer: StorageSource,
    template: etree._Element | None,
    *,
    index_here: bool,
    inactive: bool,
) -> etree._Element | None:
    # Without a template or a path there is nothing to write but a live index.
    live_index = index_here and not inactive and layer.index is not None
    if template is None and not _has_source_data(layer) and not live_index:
        return None
    src = _copy(template) if template is not None else etree.Element("source")
    _apply_source_attrs(src, layer)
    if index_here:
        _apply_index(src, layer.index, inactive=inactive)
    elif "index" in src.attrib:
        del src.attrib["index"]
    return src


def _copy_layer(bs: etree._Element) -> etree._Element:
    """A copy of one ``<backingStore>`` whose nested ``<backingStore>`` (the
    rest of the chain, rebuilt by the caller) is an empty stand-in in its
    place: copying the whole rest at every level made a chain of depth N
    cost N**2 element copies."""
    nested = [c for c in bs if c.tag == "backingStore"]
    if not nested or len(nested[0]) == 0 or bs.nsmap:
        return _copy(bs)
    new = etree.Element("backingStore")
    for key, value in bs.attrib.items():
        new.set(key, value)
    new.text, new.tail = bs.text, bs.tail
    for child in bs:
        if child is nested[0]:
            stand_in = etree.SubElement(new, "backingStore")
            stand_in.tail = child.tail
        else:
            new.append(_copy(child))
    return new


def _backing_element(
    layer: StorageSource | None,
    end: bool,
    old: Sequence[_OldLayer],
    *,
    inactive: bool,
) -> etree._Element | None:
    """The ``<backingStore>`` for ``layer`` and below (an end marker, or None)."""
    if layer is None:
        return etree.Element("backingStore") if end else None
    if layer.as_parsed:
        # what formatting it gives is what it was parsed from (a new snapshot
        # keeps the whole chain below the old top as it was): one C-level copy
        # instead of a Python pass over every layer
        copied: etree._Element = _copy(layer.tree)
        return copied
    bs_template, src_template = _templates(layer, old)
    if bs_template is not None:
        bs = _copy_layer(bs_template)
        _sync_attr(bs, "type", layer.type, _DEFAULT_LAYER_TYPE)
    else:
        bs = etree.Element("backingStore")
        _set_attr(bs, "type", layer.type)
    _apply_index(bs, layer.index, inactive=inactive)

    fmt = bs.find("format")
    if layer.format is None:
        if fmt is not None:
            bs.remove(fmt)
    else:
        if fmt is None:
            fmt = etree.Element("format")
            _place(bs, fmt, _LAYER_ORDER)
        _set_attr(fmt, "type", layer.format)

    old_src = bs.find("source")
    template = old_src if old_src is not None else src_template
    new_src = _source_element(layer, template, index_here=False, inactive=inactive)
    _replace_or_place(bs, old_src, new_src, _LAYER_ORDER)

    old_nested = bs.find("backingStore")
    nested = _backing_element(layer.backing, layer.backing_end, old, inactive=inactive)
    _replace_or_place(bs, old_nested, nested, _LAYER_ORDER)
    return bs


def _write_chain(
    owner: etree._Element,
    top: StorageSource,
    old: Sequence[_OldLayer],
    order: Sequence[str],
    *,
    inactive: bool,
) -> None:
    """Regenerate ``owner``'s ``<source>`` and ``<backingStore>`` from ``top``."""
    _bs_template, src_template = _templates(top, old)
    old_src = owner.find("source")
    new_src = _source_element(top, src_template, index_here=True, inactive=inactive)
    _replace_or_place(owner, old_src, new_src, order)
    old_bs = owner.find("backingStore")
    new_bs = _backing_element(top.backing, top.backing_end, old, inactive=inactive)
    _replace_or_place(owner, old_bs, new_bs, order)


def _mirror_element(mirror: Mirror, old: Sequence[_OldLayer]) -> etree._Element:
    """The live ``<mirror>`` of a disk."""
    if mirror.tree is not None:
        el: etree._Element = _copy(mirror.tree)
        orig = _mirror_from_element(mirror.tree)
        if _mirror_key(orig) == _mirror_key(mirror):
            return el
        defaults: dict[str, str | None] = {"type": _DEFAULT_LAYER_TYPE, "job": _DEFAULT_MIRROR_JOB}
    else:
        el = etree.Element("mirror")
        defaults = {"type": None, "job": None}
    source = mirror.source
    _sync_attr(el, "type", source.type, defaults["type"])
    # Like libvirt, a file mirror also carries the old-style file= and
    # format= attributes (read by clients older than <mirror><source>).
    legacy = source.type == "file"
    _set_attr(el, "file", source.path if legacy else None)
    _set_attr(el, "format", source.format if legacy else None)
    _sync_attr(el, "job", mirror.job, defaults["job"])
    _set_attr(el, "ready", mirror.ready)
    _order_attrs(el, _MIRROR_ATTR_ORDER)
    fmt = el.find("format")
    if source.format is None:
        if fmt is not None:
            el.remove(fmt)
    else:
        if fmt is None:
            fmt = etree.Element("format")
            _place(el, fmt, _LAYER_ORDER)
        _set_attr(fmt, "type", source.format)
    _write_chain(el, source, old, _LAYER_ORDER, inactive=False)
    return el


def _order_attrs(el: etree._Element, order: Sequence[str]) -> None:
    """Rewrite the attributes with those named in ``order`` first, in that order."""
    items = list(el.attrib.items())
    rank = {name: pos for pos, name in enumerate(order)}
    ordered = sorted(items, key=lambda item: rank.get(str(item[0]), len(order)))
    if ordered == items:
        return
    el.attrib.clear()
    for name, value in ordered:
        el.set(name, value)


def _alias_for(alias: str | None, *, inactive: bool) -> str | None:
    if inactive and not (alias and alias.startswith("ua-")):
        return None
    return alias


def _write_alias(el: etree._Element, alias: str | None, order: Sequence[str]) -> None:
    if alias is None:
        _remove_all(el, "alias")
    else:
        _set_attr(_child(el, "alias", order), "name", alias)


#: What each recently formatted disk's tree says (:func:`_tree_disk`), by the
#: tree's id, with the tree itself (so that the id is not reused meanwhile).
_TREE_DISKS: dict[int, tuple[etree._Element, Disk]] = {}
_TREE_DISKS_MAX: Final = 1024
_TREE_DISKS_LOCK = threading.Lock()


def _remember_tree_disks(disks: Iterable[Disk]) -> None:
    """Keep what each disk's tree says, as :func:`_tree_disk` would find it
    (node names differ, but nothing compared with it reaches the XML)."""
    with _TREE_DISKS_LOCK:
        for disk in disks:
            while len(_TREE_DISKS) >= _TREE_DISKS_MAX:
                del _TREE_DISKS[next(iter(_TREE_DISKS))]
            _TREE_DISKS[id(disk.tree)] = (disk.tree, disk)


def _tree_disk(tree: etree._Element) -> Disk:
    """``_disk_from_element(tree)``, remembered: one call formats the same
    parsed disks more than once (the live status, the snapshot's domain), and
    parsed trees are never changed (formatting works on copies)."""
    with _TREE_DISKS_LOCK:
        hit = _TREE_DISKS.get(id(tree))
    if hit is not None and hit[0] is tree:
        return hit[1]
    disk = _disk_from_element(tree)
    with _TREE_DISKS_LOCK:
        while len(_TREE_DISKS) >= _TREE_DISKS_MAX:
            del _TREE_DISKS[next(iter(_TREE_DISKS))]
        _TREE_DISKS[id(tree)] = (tree, disk)
    return disk


def _disk_element(disk: Disk, *, inactive: bool) -> etree._Element:
    if disk.tree is not None:
        el: etree._Element = _copy(disk.tree)
        orig: Disk | None = _tree_disk(disk.tree)
    else:
        el = etree.Element("disk")
        orig = None
    fresh = orig is None
    # disk.type and disk.source.type say the same; whichever the caller changed wins.
    base_type = orig.type if orig is not None else _DEFAULT_DISK_TYPE
    disk_type = disk.source.type if disk.source.type != base_type else disk.type
    top = disk.source
    if top.type != disk_type:
        top = dataclasses.replace(top, type=disk_type)

    _sync_attr(el, "type", disk_type, None if fresh else _DEFAULT_DISK_TYPE)
    _sync_attr(el, "device", disk.device, None if fresh else _DEFAULT_DEVICE)
    if orig is None or disk.snapshot != orig.snapshot:
        _set_attr(el, "snapshot", disk.snapshot)

    if orig is None or disk.driver_name != orig.driver_name or top.format != orig.source.format:
        driver = el.find("driver")
        if driver is None and (disk.driver_name is not None or top.format is not None):
            driver = etree.Element("driver")
            _place(el, driver, _DISK_ORDER)
        if driver is not None:
            _set_attr(driver, "name", disk.driver_name)
            _set_attr(driver, "type", top.format)
            if not driver.attrib and len(driver) == 0:
                el.remove(driver)

    if orig is None or (top is not orig.source and _layer_key(top) != _layer_key(orig.source)):
        chains = [orig.source] if orig is not None else []
        if orig is not None and orig.mirror is not None:
            chains.append(orig.mirror.source)
        if disk.mirror is not None and disk.mirror.tree is not None:
            chains.append(_mirror_from_element(disk.mirror.tree).source)
        _write_chain(el, top, _old_layers(chains), _DISK_ORDER, inactive=inactive)

    old_mirror = el.find("mirror")
    if inactive or disk.mirror is None:
        _remove_all(el, "mirror")
    else:
        chains = [disk.source]
        if orig is not None:
            chains.append(orig.source)
            if orig.mirror is not None:
                chains.append(orig.mirror.source)
        new_mirror = _mirror_element(disk.mirror, _old_layers(chains))
        _replace_or_place(el, old_mirror, new_mirror, _DISK_ORDER)

    if orig is None or disk.target != orig.target or disk.bus != orig.bus:
        target = _child(el, "target", _DISK_ORDER)
        _set_attr(target, "dev", disk.target or None)
        _set_attr(target, "bus", disk.bus)

    if disk.readonly:
        _child(el, "readonly", _DISK_ORDER)
    else:
        _remove_all(el, "readonly")

    if orig is None or disk.serial != orig.serial:
        if disk.serial is None:
            _remove_all(el, "serial")
        else:
            _set_text(_child(el, "serial", _DISK_ORDER), disk.serial)

    _write_alias(el, _alias_for(disk.alias, inactive=inactive), _DISK_ORDER)
    return el


def _channel_element(channel: Channel, *, inactive: bool) -> etree._Element:
    if channel.tree is not None:
        el: etree._Element = _copy(channel.tree)
        orig: Channel | None = _channel_from_element(channel.tree)
    else:
        el = etree.Element("channel")
        orig = None
    _sync_attr(el, "type", channel.type, None if orig is None else _DEFAULT_CHANNEL_TYPE)
    if orig is None or channel.path != orig.path:
        src = el.find("source")
        if channel.path is not None and src is None:
            src = etree.Element("source")
            src.set("mode", "bind")
            _place(el, src, _CHANNEL_ORDER)
        if src is not None:
            _set_attr(src, "path", channel.path)
    if (
        orig is None
        or channel.target_type != orig.target_type
        or channel.target_name != orig.target_name
    ):
        target = el.find("target")
        if target is None and (channel.target_type or channel.target_name):
            target = _child(el, "target", _CHANNEL_ORDER)
        if target is not None:
            _set_attr(target, "type", channel.target_type)
            _set_attr(target, "name", channel.target_name)
    _write_alias(el, _alias_for(channel.alias, inactive=inactive), _CHANNEL_ORDER)
    return el


def _domain_element(dom: Domain, *, inactive: bool) -> etree._Element:
    if dom.tree is not None:
        source_root: etree._Element = dom.tree
        if source_root.getparent() is None:
            # Copy the whole document so comments around the root survive.
            root = copy.deepcopy(source_root.getroottree()).getroot()
        else:
            root = _copy(source_root)
        # what the tree says of the fields compared below (its disks and
        # channels are written from the model whatever the tree says)
        orig: Domain | None = _head_from_element(source_root)
    else:
        root = etree.Element("domain")
        orig = None

    _set_attr(root, "type", dom.type)
    if inactive or dom.id is None:
        _set_attr(root, "id", None)
    elif orig is None or dom.id != orig.id:
        _set_attr(root, "id", str(dom.id))

    if orig is None or dom.name != orig.name:
        _set_text(_child(root, "name", _DOMAIN_ORDER), dom.name)
    if dom.uuid and (orig is None or orig.uuid != _normalize_uuid(dom.uuid)):
        _set_text(_child(root, "uuid", _DOMAIN_ORDER), dom.uuid)
    if (orig is None and dom.memory_kib) or (
        orig is not None and dom.memory_kib != orig.memory_kib
    ):
        memory = _child(root, "memory", _DOMAIN_ORDER)
        _set_attr(memory, "unit", "KiB")
        _set_text(memory, str(dom.memory_kib))
    if orig is None or dom.vcpu != orig.vcpu:
        vcpu = root.find("vcpu")
        if vcpu is None:
            vcpu = etree.Element("vcpu")
            vcpu.set("placement", "static")
            _place(root, vcpu, _DOMAIN_ORDER)
        _set_text(vcpu, str(dom.vcpu))
    if (
        orig is None
        or dom.os_type != orig.os_type
        or dom.arch != orig.arch
        or dom.machine != orig.machine
    ):
        os_type = _child(_child(root, "os", _DOMAIN_ORDER), "type", _OS_ORDER)
        _set_attr(os_type, "arch", dom.arch)
        _set_attr(os_type, "machine", dom.machine)
        _set_text(os_type, dom.os_type)

    devices = root.find("devices")
    if devices is None and (orig is None or dom.emulator or dom.disks or dom.channels):
        devices = _child(root, "devices", _DOMAIN_ORDER)
    if devices is not None:
        if orig is None or dom.emulator != orig.emulator:
            if dom.emulator is None:
                _remove_all(devices, "emulator")
            else:
                _set_text(_child(devices, "emulator", _DEVICES_ORDER), dom.emulator)
        disks = [_disk_element(d, inactive=inactive) for d in dom.disks]
        _fill_slots(devices, "disk", disks, _DEVICES_ORDER)
        channels = [_channel_element(c, inactive=inactive) for c in dom.channels]
        _fill_slots(devices, "channel", channels, _DEVICES_ORDER)
    return root


def domain_element(dom: Domain, *, inactive: bool = False) -> etree._Element:
    """Like :func:`format_domain`, but the element, for embedding in another document."""
    return _domain_element(dom, inactive=inactive)


def format_domain(dom: Domain, *, inactive: bool = False) -> str:
    """Write a domain as libvirt-style XML text.

    :param dom: the domain; its ``tree`` (if any) is copied, never changed.
    :param inactive: write the persistent form (no id, alias, mirror or
        runtime-added ``index=``) instead of the live one.
    :raise VirtError: ``INVALID_ARG`` if a modelled value cannot be written as
        XML (control characters); ``XML_ERROR`` if the UUID is malformed.
    :return: the document, ending with a newline.
    """
    return serialize_document(_domain_element(dom, inactive=inactive), owned=True)


def parse_disk_source(text: str | bytes) -> StorageSource:
    """The destination of ``blockCopy``: a ``<disk type='file|block'>`` with
    ``<source file|dev=>`` and an optional ``<driver type=>``.

    :raise VirtError: XML_ERROR for malformed XML, a missing or relative path,
        an unsupported disk type.
    """
    root = parse_document(text, what="block copy destination", root_tag="disk")
    typ = root.get("type", "file")
    if typ not in ("file", "block"):
        raise _xml_error(f"block copy destination of type '{typ}' is not supported")
    src = root.find("source")
    path = _source_path(src, typ)
    if not path:
        raise _xml_error("block copy destination needs <source file=...> or <source dev=...>")
    if not path.startswith("/"):
        raise VirtError(ErrorCode.INVALID_ARG, "absolute path must be used as block copy target")
    drv = root.find("driver")
    fmt = drv.get("type") if drv is not None else None
    return StorageSource(type=typ, path=path, format=fmt, tree=src)
