"""Hardened XML text <-> lxml tree conversion for every document virtshift reads.

:func:`parse_document` is the only way user-supplied XML text becomes a tree.
It refuses, before or while parsing, everything a libvirt-style document never
needs and an attacker could use:

* documents larger than :data:`MAX_DOCUMENT_BYTES` (1 MiB);
* any ``<!DOCTYPE`` or ``<!ENTITY`` declaration (so no entity expansion
  "billion laughs" and no external ``SYSTEM`` entities: nothing from the file
  system or the network is ever read).  The text is searched before parsing,
  so such a string is refused even inside a comment or CDATA section;
* bytes that are not UTF-8 (the declared ``encoding=`` is ignored: documents
  are UTF-8, or already-decoded :class:`str`);
* malformed XML, a root element other than the expected one, and element
  nesting deeper than :data:`MAX_DEPTH` levels.

Every refusal is a :class:`~virtshift.errors.VirtError` with code
``XML_ERROR`` whose detail starts with what was being parsed (for example
``domain definition: ...``); no other exception escapes for bad input.

:func:`serialize_document` writes a tree back the way libvirt formats XML:
two-space indentation, attributes in single quotes (``'`` inside a value
written as ``&apos;``), no XML declaration and a trailing newline.  Mixed
content (text next to child elements) is written verbatim, without
re-indentation.

This module does not know any libvirt element; schema-level meaning lives in
:mod:`virtshift.xml.domain` and its siblings.  It does no file or network IO.
"""

from __future__ import annotations

import re
from typing import Any, Final, cast

from lxml import etree

from virtshift.errors import ErrorCode, ErrorDomain, VirtError

__all__ = ["MAX_DEPTH", "MAX_DOCUMENT_BYTES", "parse_document", "serialize_document"]

#: Largest accepted document, in bytes of UTF-8.
MAX_DOCUMENT_BYTES: Final = 1024 * 1024

#: Deepest accepted element nesting; the root element is level 1.
MAX_DEPTH: Final = 64

_DECLARATION_RE: Final = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_XML_NS: Final = "http://www.w3.org/XML/1998/namespace"
_INDENT: Final = "  "


def _fail(what: str, problem: str, cause: BaseException | None = None) -> VirtError:
    return VirtError(
        ErrorCode.XML_ERROR, f"{what}: {problem}", domain=ErrorDomain.CONF, cause=cause
    )


def _make_parser() -> etree.XMLParser:
    # A new parser per call: lxml parsers keep state (error log) and are not
    # meant to be shared between threads.
    return etree.XMLParser(
        encoding="utf-8",
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=False,
        remove_pis=False,
        remove_blank_text=False,
        collect_ids=False,
    )


def _to_utf8(text: str | bytes, what: str) -> bytes:
    """The document as UTF-8 bytes, refusing oversize or undecodable input."""
    if isinstance(text, str):
        if len(text) > MAX_DOCUMENT_BYTES:
            raise _fail(what, f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _fail(what, "document is not valid Unicode", err) from err
    elif isinstance(text, bytes | bytearray | memoryview):
        data = bytes(text)
    else:
        raise _fail(what, f"expected XML text, got {type(text).__name__}")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _fail(what, f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
    return data


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _check_depth(root: etree._Element, what: str) -> None:
    depth = 0
    for event, _el in etree.iterwalk(root, events=("start", "end")):
        if event == "start":
            depth += 1
            if depth > MAX_DEPTH:
                raise _fail(what, f"elements are nested deeper than {MAX_DEPTH} levels")
        else:
            depth -= 1


def parse_document(text: str | bytes, *, what: str, root_tag: str) -> etree._Element:
    """Parse untrusted XML text into a tree, refusing anything unsafe.

    :param text: the document; :class:`bytes` must be UTF-8.
    :param what: names the document in error messages ("domain definition").
    :param root_tag: the required (namespace-less) root element name.
    :raise VirtError: ``XML_ERROR`` when the document is too large, declares a
        DOCTYPE or entities, is not UTF-8, is not well formed, nests too deep or
        has another root element.
    :return: the root element.
    """
    data = _to_utf8(text, what)
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _fail(what, f"document is not valid UTF-8 (byte offset {err.start})", err) from err
    if _DECLARATION_RE.search(decoded):
        raise _fail(what, "DOCTYPE and ENTITY declarations are not allowed")
    if decoded.startswith("\ufeff"):
        data = data[3:]
    if not data.strip():
        raise _fail(what, "document is empty")
    try:
        root = etree.fromstring(data, _make_parser())
    except etree.XMLSyntaxError as err:
        raise _fail(what, f"malformed XML: {_one_line(err)}", err) from err
    except (etree.LxmlError, ValueError) as err:
        raise _fail(what, f"cannot parse document: {_one_line(err)}", err) from err
    if root is None:
        raise _fail(what, "document has no root element")
    # lxml-stubs lack DocInfo.doctype / internalDTD / externalDTD.
    docinfo: Any = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise _fail(what, "DOCTYPE and ENTITY declarations are not allowed")
    if root.tag != root_tag:
        shown = root.tag if isinstance(root.tag, str) else "?"
        raise _fail(what, f"unexpected root element <{shown}>, expecting <{root_tag}>")
    _check_depth(root, what)
    return root


# --------------------------------------------------------------------------
# Writing


_TEXT_SPECIAL: Final = re.compile(r"[&<>]")
_ATTR_SPECIAL: Final = re.compile("[&<>'\"\n\r\t]")


def _escape_text(value: str) -> str:
    if _TEXT_SPECIAL.search(value) is None:
        return value
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attr(value: str) -> str:
    if _ATTR_SPECIAL.search(value) is None:
        return value
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )


def _qname(el: etree._Element, name: str, *, attribute: bool) -> str:
    """``prefix:local`` for a ``{uri}local`` name, using the element's in-scope prefixes."""
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    if uri == _XML_NS:
        return f"xml:{local}"
    candidates = [p for p, u in el.nsmap.items() if u == uri]
    if not attribute and el.prefix in candidates:
        return f"{el.prefix}:{local}" if el.prefix else local
    named = sorted(p for p in candidates if p)
    if named:
        return f"{named[0]}:{local}"
    if not attribute and None in candidates:
        return local
    # lxml always declares a prefix for the namespaces it uses; not reachable
    # for trees built through lxml.
    raise ValueError(f"no namespace prefix in scope for {uri!r}")


def _start_tag(el: etree._Element, tag: str, parent_nsmap: dict[str | None, str] | None) -> str:
    """The start tag's inside; ``parent_nsmap`` None: no namespace is in scope."""
    parts = [tag]
    if parent_nsmap is not None:
        for prefix, uri in el.nsmap.items():
            if parent_nsmap.get(prefix) != uri:
                name = f"xmlns:{prefix}" if prefix else "xmlns"
                parts.append(f"{name}='{_escape_attr(uri)}'")
    for key, value in el.attrib.items():
        # lxml-stubs say str | bytes; lxml gives str
        name = cast(str, key)
        if name[0] == "{":
            name = _qname(el, name, attribute=True)
        parts.append(f"{name}='{_escape_attr(cast(str, value))}'")
    return " ".join(parts)


def _is_blank(value: str | None) -> bool:
    return value is None or not value.strip()


def _write_node(
    node: etree._Element,
    level: int,
    out: list[str],
    parent_nsmap: dict[str | None, str] | None,
    *,
    pretty: bool,
) -> None:
    """Append ``node`` to ``out``; ``parent_nsmap`` None: the document has no namespaces."""
    raw_tag = node.tag
    if not isinstance(raw_tag, str):  # comment, processing instruction, entity
        if isinstance(node, etree._Comment):
            out.append(f"<!--{node.text or ''}-->")
        elif isinstance(node, etree._ProcessingInstruction):
            body = f" {node.text}" if node.text else ""
            target = cast(str, node.target)  # lxml-stubs say bytes; lxml gives str
            out.append(f"<?{target}{body}?>")
        elif isinstance(node, etree._Entity):
            out.append(f"&{node.name};")
        return
    if parent_nsmap is None:
        tag = raw_tag
        nsmap = None
    else:
        tag = _qname(node, raw_tag, attribute=False)
        nsmap = dict(node.nsmap)
    start = _start_tag(node, tag, parent_nsmap)
    text = node.text
    if len(node) == 0:
        # Whitespace spanning lines inside a leaf is indentation of an element
        # that once had children; libvirt prints such an element as empty.
        if not text or (pretty and "\n" in text and not text.strip()):
            out.append(f"<{start}/>")
        else:
            out.append(f"<{start}>{_escape_text(text)}</{tag}>")
        return
    children = list(node)
    out.append(f"<{start}>")
    if pretty and _is_blank(text) and all(_is_blank(c.tail) for c in children):
        inner = "\n" + _INDENT * (level + 1)
        for child in children:
            out.append(inner)
            _write_node(child, level + 1, out, nsmap, pretty=True)
        out.append(f"\n{_INDENT * level}</{tag}>")
        return
    if text:
        out.append(_escape_text(text))
    for child in children:
        _write_node(child, level + 1, out, nsmap, pretty=False)
        if child.tail:
            out.append(_escape_text(child.tail))
    out.append(f"</{tag}>")


def _has_namespaces(root: etree._Element) -> bool:
    """True when any element of ``root`` has a namespace in scope (besides ``xml:``)."""
    return bool(root.xpath("boolean(descendant-or-self::*/namespace::*[name() != 'xml'])"))


#: A tag in lxml's output of a tree without comments, processing instructions
#: or CDATA, with a quote in it: there, ``<`` and ``>`` only delimit tags (text
#: and attribute values carry them escaped).
_QUOTED_TAG: Final = re.compile(r'<[^>]*"[^>]*>')


def _requote(match: re.Match[str]) -> str:
    # inside a tag lxml writes, '"' only delimits values and "'" is only in one
    return match.group(0).replace("'", "&apos;").replace('"', "'")


def _indent_in_place(node: etree._Element, level: int) -> None:
    """Give ``node`` (pretty-printed at ``level``) the whitespace :func:`_write_node`
    writes, so that lxml's serializer writes the same text; what
    :func:`_write_node` writes verbatim is left as it is."""
    if len(node) == 0:
        text = node.text
        if text is not None and (text == "" or ("\n" in text and not text.strip())):
            node.text = None
        return
    if not _is_blank(node.text) or not all(_is_blank(c.tail) for c in node):
        _empty_text_to_none(node)
        return
    inner = "\n" + _INDENT * (level + 1)
    node.text = inner
    child = node  # for the type checker: node has children
    for child in node:
        child.tail = inner
        _indent_in_place(child, level + 1)
    child.tail = "\n" + _INDENT * level


def _empty_text_to_none(node: etree._Element) -> None:
    """An empty leaf text is no text (``<a/>``, as :func:`_write_node` writes it;
    lxml would write ``<a></a>``)."""
    for el in node.iter():
        if el.text == "" and len(el) == 0:
            el.text = None


#: An element whose text :func:`_write_node` does not simply re-indent: mixed
#: content (non-blank text beside child elements), or a leaf whose text is
#: blank (or empty).  Without any, lxml's ``indent`` does what it does.
_UNEVEN: Final = etree.XPath(
    "boolean(descendant-or-self::*[*][text()[normalize-space()]]"
    " | descendant-or-self::*[not(*)][text()][not(normalize-space())])"
)


def _serialize_owned(root: etree._Element) -> str | None:
    """:func:`serialize_document`'s text through lxml's C serializer, for a tree
    without namespaces, comments, processing instructions or entities around or
    in it; None for any other tree.  Rewrites the tree's indentation."""
    if root.getprevious() is not None or root.getnext() is not None:
        return None
    for _odd in root.iter(etree.Comment, etree.ProcessingInstruction, etree.Entity):
        return None
    if _UNEVEN(root):
        _indent_in_place(root, 0)
    else:
        etree.indent(root, space=_INDENT)
    out = etree.tostring(root, encoding="unicode", with_tail=False)
    if "&#13;" in out or "xmlns" in out:
        # lxml writes a carriage return in text as a reference (_write_node as
        # is), and namespace declarations where the tree has them
        return None
    return _QUOTED_TAG.sub(_requote, out) + "\n"


def serialize_document(root: etree._Element, *, owned: bool = False) -> str:
    """Write ``root`` (and comments / processing instructions around it) as libvirt does.

    :param root: the document element.
    :param owned: the caller built ``root`` for this call and does not use it
        afterwards: its indentation may be rewritten, which lets most
        documents be written by lxml's C serializer (the same text, an order of
        magnitude sooner).
    :raise ValueError: if the tree uses a namespace without a prefix in scope
        (cannot happen for trees built with lxml).
    :return: the text, ending with a newline.
    """
    if owned:
        fast = _serialize_owned(root)
        if fast is not None:
            return fast
    out: list[str] = []
    top: dict[str | None, str] | None = {} if _has_namespaces(root) else None
    for sibling in reversed(list(root.itersiblings(preceding=True))):
        _write_node(sibling, 0, out, top, pretty=True)
        out.append("\n")
    _write_node(root, 0, out, top, pretty=True)
    out.append("\n")
    for sibling in root.itersiblings():
        _write_node(sibling, 0, out, top, pretty=True)
        out.append("\n")
    return "".join(out)
