"""The snapshot tree of one domain: parents, children, the current snapshot.

A :class:`SnapshotTree` is an immutable value.  Every change (:meth:`~SnapshotTree.add`,
:meth:`~SnapshotTree.redefine`, :meth:`~SnapshotTree.delete`,
:meth:`~SnapshotTree.set_current`) returns a new tree, so a planner can compute
the tree a step *would* leave behind and the runtime saves it only once the step
succeeded.  The rules are libvirt's (``virdomainmomentobjlist.c`` and the
snapshot parts of the qemu and test drivers), checked against libvirt's own
virsh scenario (``tests/virshtestdata/snapshot.in``):

* a new snapshot needs a unique name and an existing parent (or none);
* a redefinition may replace an existing snapshot but must not name itself as
  parent, name an unknown parent, or create a cycle;
* listing uses ``virDomainSnapshotListFlags`` bit for bit (:class:`ListFlag`);
* deleting reparents children, or removes whole subtrees, and moves "current"
  to the nearest remaining ancestor.

The module also renders what virsh prints for ``snapshot-list`` (``--tree``,
the table, ``--name``), as pure functions of the tree.

It deliberately does no IO, does not parse or format snapshot XML (that is
:mod:`virtshift.model.snapshot`, whose ``SnapshotDef`` this module does not
need) and knows nothing of disks or QEMU: a :class:`SnapNode` carries only the
facts the tree rules and the listing filters look at.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, NoReturn

from virtshift.errors import ErrorCode, ErrorDomain, NoDomainSnapshot, VirtError
from virtshift.text import render_table

__all__ = [
    "ListFlag",
    "SnapNode",
    "SnapshotTree",
    "format_creation_time",
    "name_sort_key",
    "render_list",
    "render_names",
    "render_tree",
]


class ListFlag(enum.IntFlag):
    """libvirt's ``virDomainSnapshotListFlags`` (prefix ``VIR_DOMAIN_SNAPSHOT_LIST_``).

    Bit 1 has two names: ``ROOTS`` on domain-level listings (only parentless
    snapshots) and ``DESCENDANTS`` on per-snapshot listings (all descendants
    instead of the direct children only).
    """

    ROOTS = 1
    DESCENDANTS = 1
    METADATA = 2
    LEAVES = 4
    NO_LEAVES = 8
    NO_METADATA = 16
    INACTIVE = 32
    ACTIVE = 64
    DISK_ONLY = 128
    INTERNAL = 256
    EXTERNAL = 512
    TOPOLOGICAL = 1024


#: Every bit :meth:`SnapshotTree.list` understands; anything else is refused.
_LIST_KNOWN: Final[int] = 2047

#: The filter groups.  Within a group the selected bits are OR-ed; a group with
#: no bit selected does not filter.  Each group's categories cover every
#: snapshot, so selecting all bits of a group also keeps everything.
_LEAF_GROUP: Final[int] = ListFlag.LEAVES | ListFlag.NO_LEAVES
_METADATA_GROUP: Final[int] = ListFlag.METADATA | ListFlag.NO_METADATA
_STATE_GROUP: Final[int] = ListFlag.INACTIVE | ListFlag.ACTIVE | ListFlag.DISK_ONLY
_LOCATION_GROUP: Final[int] = ListFlag.INTERNAL | ListFlag.EXTERNAL


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapNode:
    """What the tree knows of one snapshot.

    The full definition (disks, memory, the domain XML) lives in ``SnapshotDef``;
    this is the part that parent/child rules and listing filters need.
    """

    #: The snapshot's name, unique within its domain.
    name: str
    #: The parent snapshot's name; None for a root.
    parent: str | None
    #: ``<creationTime>``: seconds since the Epoch, UTC.
    creation_time: int
    #: ``<state>``: 'running', 'paused', 'shutoff', 'disk-snapshot', ...
    #: ('shutoff' lists as INACTIVE, 'disk-snapshot' as DISK_ONLY, any other as ACTIVE).
    state: str
    #: True when the memory or any disk is ``snapshot='external'``.
    external: bool
    #: False for a snapshot libvirt lists without managing its metadata.
    has_metadata: bool = True


# -- sorting -----------------------------------------------------------------------

_ASCII_FOLD: Final[dict[int, int]] = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def name_sort_key(name: str) -> tuple[str, str]:
    """The order virsh shows snapshots in: ASCII case-insensitive, then exact.

    virsh sorts its listings with ``strcasecmp`` (only A-Z fold); the second
    element makes the order total when two names differ only in case.
    """
    return (name.translate(_ASCII_FOLD), name)


def _sorted(names: Iterable[str]) -> builtins.list[str]:
    return sorted(names, key=name_sort_key)


# -- errors ------------------------------------------------------------------------


def _no_snapshot(name: str) -> NoDomainSnapshot:
    return NoDomainSnapshot(f"no domain snapshot with matching name '{name}'")


def _exists(name: str) -> VirtError:
    return VirtError(
        ErrorCode.OPERATION_FAILED,
        f"domain moment {name} already exists",
        domain=ErrorDomain.DOMAIN_SNAPSHOT,
    )


def _invalid(detail: str) -> VirtError:
    return VirtError(ErrorCode.INVALID_ARG, detail, domain=ErrorDomain.DOMAIN_SNAPSHOT)


def _parent_not_found(parent: str, name: str) -> VirtError:
    return _invalid(f"parent {parent} for moment {name} not found")


def _bad_flags(flags: int, known: int, function: str) -> NoReturn:
    raise _invalid(f"unsupported flags (0x{flags & ~known:x}) in function {function}")


# -- the tree ----------------------------------------------------------------------


class SnapshotTree:
    """The snapshots of one domain and which one is current; an immutable value.

    :param nodes: the snapshots, in any order.
    :param current: the current snapshot's name, or None.
    :raise VirtError: OPERATION_FAILED for a duplicate name; INVALID_ARG for a
        snapshot that is its own parent, whose parent is missing, or that sits in
        a parent cycle.
    :raise NoDomainSnapshot: when ``current`` names no snapshot.

    Two trees are equal when they hold equal nodes and the same current snapshot.
    Names are always returned in virsh's order (:func:`name_sort_key`) unless a
    method says otherwise.
    """

    __slots__ = ("_children", "_current", "_nodes")

    _nodes: dict[str, SnapNode]
    _children: dict[str | None, tuple[str, ...]]
    _current: str | None

    def __init__(self, nodes: Iterable[SnapNode] = (), *, current: str | None = None) -> None:
        table: dict[str, SnapNode] = {}
        for node in nodes:
            if node.name in table:
                raise _exists(node.name)
            table[node.name] = node
        for name in _sorted(table):
            parent = table[name].parent
            if parent == name:
                raise _invalid(f"cannot set moment {name} as its own parent")
            if parent is not None and parent not in table:
                raise _parent_not_found(parent, name)
        children = _index(table)
        seen = set(_walk_preorder(children, None))
        if len(seen) != len(table):
            # Every parent exists, so what cannot be reached from a root hangs in
            # (or below) a cycle: walk up until a name repeats, and name that one.
            name = _sorted(n for n in table if n not in seen)[0]
            walked: set[str] = set()
            while name not in walked:
                walked.add(name)
                name = table[name].parent or name
            raise _invalid(f"parent {table[name].parent} would create cycle to {name}")
        if current is not None and current not in table:
            raise _no_snapshot(current)
        self._init(table, children, current)

    def _init(
        self,
        table: dict[str, SnapNode],
        children: dict[str | None, tuple[str, ...]],
        current: str | None,
    ) -> None:
        object.__setattr__(self, "_nodes", table)
        object.__setattr__(self, "_children", children)
        object.__setattr__(self, "_current", current)

    @classmethod
    def _trusted(cls, table: dict[str, SnapNode], current: str | None) -> SnapshotTree:
        """A tree from a table the caller already knows to be consistent."""
        tree = cls.__new__(cls)
        tree._init(table, _index(table), current)
        return tree

    # -- value behaviour ----------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SnapshotTree):
            return NotImplemented
        return self._current == other._current and self._nodes == other._nodes

    def __hash__(self) -> int:
        return hash((frozenset(self._nodes.values()), self._current))

    def __repr__(self) -> str:
        return f"SnapshotTree({len(self._nodes)} snapshots, current={self._current!r})"

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[str]:
        """The names, parents before children (siblings in virsh's order)."""
        return iter(_walk_preorder(self._children, None))

    # -- lookups --------------------------------------------------------------------

    @property
    def nodes(self) -> Mapping[str, SnapNode]:
        """Read-only view: name -> node."""
        return MappingProxyType(self._nodes)

    @property
    def current(self) -> str | None:
        """The current snapshot's name, or None."""
        return self._current

    def get(self, name: str) -> SnapNode:
        """The snapshot called ``name``.

        :raise NoDomainSnapshot: "no domain snapshot with matching name 'x'".
        """
        try:
            return self._nodes[name]
        except KeyError:
            raise _no_snapshot(name) from None

    def parent_of(self, name: str) -> SnapNode:
        """The parent of ``name`` (``virDomainSnapshotGetParent``).

        :raise NoDomainSnapshot: when ``name`` is unknown, or is a root
            ("snapshot 'x' does not have a parent").
        """
        parent = self.get(name).parent
        if parent is None:
            raise NoDomainSnapshot(f"snapshot '{name}' does not have a parent")
        return self._nodes[parent]

    def current_node(self) -> SnapNode:
        """The current snapshot (``virDomainSnapshotCurrent``).

        :raise NoDomainSnapshot: "the domain does not have a current snapshot".
        """
        if self._current is None:
            raise NoDomainSnapshot("the domain does not have a current snapshot")
        return self._nodes[self._current]

    def roots(self) -> builtins.list[str]:
        """The parentless snapshots."""
        return builtins.list(self._children.get(None, ()))

    def children(self, name: str) -> builtins.list[str]:
        """The direct children of ``name``.

        :raise NoDomainSnapshot: when ``name`` is unknown.
        """
        self.get(name)
        return builtins.list(self._children.get(name, ()))

    def descendants(self, name: str) -> builtins.list[str]:
        """Every descendant of ``name``, parents before children (pre-order).

        :raise NoDomainSnapshot: when ``name`` is unknown.
        """
        self.get(name)
        return _walk_preorder(self._children, name)

    def is_leaf(self, name: str) -> bool:
        """True when ``name`` has no children.

        :raise NoDomainSnapshot: when ``name`` is unknown.
        """
        self.get(name)
        return not self._children.get(name)

    # -- changes --------------------------------------------------------------------

    def add(self, node: SnapNode, *, make_current: bool = True) -> SnapshotTree:
        """The tree with a newly created snapshot.

        :param make_current: the new snapshot becomes current (libvirt does this
            for every snapshot it creates).
        :raise VirtError: OPERATION_FAILED "domain moment X already exists";
            INVALID_ARG "parent P for moment X not found".
        """
        if node.name in self._nodes:
            raise _exists(node.name)
        if node.parent is not None and node.parent not in self._nodes:
            raise _parent_not_found(node.parent, node.name)
        table = dict(self._nodes)
        table[node.name] = node
        return SnapshotTree._trusted(table, node.name if make_current else self._current)

    def redefine(self, node: SnapNode, *, make_current: bool) -> SnapshotTree:
        """The tree with ``node`` defined from saved metadata (``CREATE_REDEFINE``).

        A new name is added; an existing name has its node replaced and keeps its
        children (which follow it if the parent changes).  A redefined snapshot
        that was current stays current, as in libvirt.

        :param make_current: the snapshot becomes current (``CREATE_CURRENT``).
        :raise VirtError: INVALID_ARG for "cannot set moment X as its own parent",
            "parent P for moment X not found" or "parent C would create cycle to
            X" (C is the ancestor of the requested parent whose own parent is X,
            as libvirt reports it).
        """
        name, parent = node.name, node.parent
        if parent is not None:
            if parent == name:
                raise _invalid(f"cannot set moment {name} as its own parent")
            if parent not in self._nodes:
                raise _parent_not_found(parent, name)
            # Walk up from the requested parent: reaching `name` means a cycle.
            other = self._nodes[parent]
            while other.parent is not None:
                if other.parent == name:
                    raise _invalid(f"parent {other.name} would create cycle to {name}")
                other = self._nodes[other.parent]
        table = dict(self._nodes)
        table[name] = node
        current = name if make_current or self._current == name else self._current
        return SnapshotTree._trusted(table, current)

    def set_current(self, name: str | None) -> SnapshotTree:
        """The tree with ``name`` as current snapshot (None: no current snapshot).

        :raise NoDomainSnapshot: when ``name`` is unknown.
        """
        if name is not None:
            self.get(name)
        return SnapshotTree._trusted(dict(self._nodes), name)

    def delete(
        self, name: str, *, children: bool = False, children_only: bool = False
    ) -> tuple[SnapshotTree, builtins.list[str]]:
        """The tree after ``virDomainSnapshotDelete`` of ``name``, and what went.

        * Neither flag: only ``name`` goes; its children move up to its parent
          (they become roots when it was a root).  Their ``parent`` changes, so
          the caller rewrites their metadata.
        * ``children`` (``DELETE_CHILDREN``): ``name`` and all its descendants go.
        * ``children_only`` (``DELETE_CHILDREN_ONLY``): all descendants go,
          ``name`` stays.

        "Current" moves like in libvirt's test driver: if a removed snapshot was
        current, the named snapshot becomes current with ``children_only``, and
        otherwise the named snapshot's parent does; a removed current root
        leaves the domain with no current snapshot.

        :return: the new tree, and the removed names with every snapshot after
            all of its descendants (post-order, siblings in virsh's order), so
            removing their data in that order never orphans an overlay.
        :raise VirtError: INVALID_ARG when both flags are given.
        :raise NoDomainSnapshot: when ``name`` is unknown.
        """
        if children and children_only:
            raise _invalid(
                "Flags 'VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN' and "
                "'VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY' are mutually exclusive"
            )
        node = self.get(name)
        table = dict(self._nodes)
        current = self._current
        if children or children_only:
            removed = _walk_postorder(self._children, name)
            if children:
                removed.append(name)
            for gone in removed:
                del table[gone]
            if current in removed:
                current = name if children_only else node.parent
        else:
            removed = [name]
            del table[name]
            for child in self._children.get(name, ()):
                table[child] = dataclasses.replace(table[child], parent=node.parent)
            if current == name:
                current = node.parent
        return SnapshotTree._trusted(table, current), removed

    # -- listing --------------------------------------------------------------------

    def list(self, flags: int = 0, *, of: str | None = None) -> builtins.list[str]:
        """Names selected by ``virDomainSnapshotListFlags``.

        Without ``of`` this is ``virDomainSnapshotListNames``: every snapshot,
        or only roots with ``ROOTS``.  With ``of`` it is
        ``virDomainSnapshotListChildrenNames``: the direct children of ``of``,
        or all its descendants with ``DESCENDANTS`` (the same bit as ``ROOTS``).
        The filter groups {LEAVES, NO_LEAVES}, {METADATA, NO_METADATA},
        {INACTIVE, ACTIVE, DISK_ONLY} and {INTERNAL, EXTERNAL} then apply: bits
        of one group are OR-ed, groups are AND-ed, a group without bits keeps
        everything.

        :return: names in virsh's order, or with ``TOPOLOGICAL`` parents before
            children (pre-order, siblings in virsh's order).
        :raise VirtError: INVALID_ARG for bits libvirt does not define.
        :raise NoDomainSnapshot: when ``of`` is unknown.
        """
        function = (
            "virDomainSnapshotListNames" if of is None else "virDomainSnapshotListChildrenNames"
        )
        return self._select(flags, of, function)

    def count(self, flags: int = 0, *, of: str | None = None) -> int:
        """How many names :meth:`list` would return (``virDomainSnapshotNum``,
        ``virDomainSnapshotNumChildren``).

        ``TOPOLOGICAL`` is accepted and changes nothing.

        :raise VirtError: INVALID_ARG for bits libvirt does not define.
        :raise NoDomainSnapshot: when ``of`` is unknown.
        """
        function = "virDomainSnapshotNum" if of is None else "virDomainSnapshotNumChildren"
        return len(self._select(flags, of, function))

    def _select(self, flags: int, of: str | None, function: str) -> builtins.list[str]:
        if flags & ~_LIST_KNOWN or flags < 0:
            _bad_flags(flags, _LIST_KNOWN, function)
        recurse = bool(flags & ListFlag.DESCENDANTS)
        if of is None:
            candidates = self.roots() if recurse else _walk_preorder(self._children, None)
        elif recurse:
            candidates = self.descendants(of)
        else:
            candidates = self.children(of)
        picked = [n for n in candidates if self._matches(self._nodes[n], flags)]
        if not flags & ListFlag.TOPOLOGICAL:
            picked.sort(key=name_sort_key)
        return picked

    def _matches(self, node: SnapNode, flags: int) -> bool:
        if flags & _LEAF_GROUP:
            bit = ListFlag.NO_LEAVES if self._children.get(node.name) else ListFlag.LEAVES
            if not flags & bit:
                return False
        if flags & _METADATA_GROUP:
            bit = ListFlag.METADATA if node.has_metadata else ListFlag.NO_METADATA
            if not flags & bit:
                return False
        if flags & _STATE_GROUP:
            if node.state == "shutoff":
                bit = ListFlag.INACTIVE
            elif node.state == "disk-snapshot":
                bit = ListFlag.DISK_ONLY
            else:
                bit = ListFlag.ACTIVE
            if not flags & bit:
                return False
        if flags & _LOCATION_GROUP:
            bit = ListFlag.EXTERNAL if node.external else ListFlag.INTERNAL
            if not flags & bit:
                return False
        return True


def _index(table: Mapping[str, SnapNode]) -> dict[str | None, tuple[str, ...]]:
    """parent name (None for roots) -> children, in virsh's order."""
    grouped: dict[str | None, builtins.list[str]] = {}
    for node in table.values():
        grouped.setdefault(node.parent, []).append(node.name)
    return {parent: tuple(_sorted(kids)) for parent, kids in grouped.items()}


def _walk_preorder(children: Mapping[str | None, Sequence[str]], top: str | None) -> list[str]:
    """Descendants of ``top`` (None: the whole forest), each before its children."""
    out: list[str] = []
    stack = builtins.list(reversed(children.get(top, ())))
    while stack:
        name = stack.pop()
        out.append(name)
        stack.extend(reversed(children.get(name, ())))
    return out


def _walk_postorder(children: Mapping[str | None, Sequence[str]], top: str) -> list[str]:
    """Descendants of ``top``, each after all of its own descendants."""
    out: list[str] = []
    # (name, expanded): a name is emitted the second time it is popped.
    stack: list[tuple[str, bool]] = [(c, False) for c in reversed(children.get(top, ()))]
    while stack:
        name, expanded = stack.pop()
        if expanded:
            out.append(name)
        else:
            stack.append((name, True))
            stack.extend((c, False) for c in reversed(children.get(name, ())))
    return out


# -- virsh output ------------------------------------------------------------------
#
# Each renderer returns exactly what the virsh command itself prints.  virsh's
# command loop then prints one more newline after every command (suppressed by
# --quiet); that is why snapshot.out shows an empty line after each listing.
# The CLI adds that newline, not these functions.


def render_tree(tree: SnapshotTree, *, start: str | None = None) -> str:
    """``virsh snapshot-list --tree`` (with ``--from start``: that subtree).

    Roots and siblings come in virsh's order.  Below each snapshot with children
    comes a ``|`` line; after the last child of a branch that has no children of
    its own comes a line holding only the indentation (trailing spaces kept, as
    virsh prints them).

    :raise NoDomainSnapshot: when ``start`` is unknown.
    """
    tops = [tree.get(start).name] if start is not None else tree.roots()
    lines: list[str] = []
    for top in tops:
        _tree_lines(tree, top, indent="", root=True, last=True, out=lines)
    return "".join(line + "\n" for line in lines)


def _tree_lines(
    tree: SnapshotTree, name: str, *, indent: str, root: bool, last: bool, out: list[str]
) -> None:
    # iterative (a chain of thousands of snapshots is deeper than Python's
    # recursion limit); every line of a node depends only on the node itself
    stack: list[tuple[str, str, bool, bool]] = [(name, indent, root, last)]
    while stack:
        name, indent, root, last = stack.pop()
        out.append(indent + ("" if root else "+- ") + name)
        inner = indent if root else indent + (" " if last else "|") + " "
        kids = tree.children(name)
        if kids:
            out.append(inner + "  |")
            for i in reversed(range(len(kids))):
                stack.append((kids[i], inner + "  ", False, i == len(kids) - 1))
        elif last:
            out.append(inner)


def format_creation_time(seconds: int) -> str:
    """A creation time as virsh shows it: ``%Y-%m-%d %H:%M:%S %z``, local time.

    A value the platform cannot convert is shown as the plain number.
    """
    try:
        moment = datetime.fromtimestamp(seconds).astimezone()
    except (OverflowError, OSError, ValueError):
        return str(seconds)
    return moment.strftime("%Y-%m-%d %H:%M:%S %z")


def render_list(rows: Sequence[SnapNode], *, parent: bool = False) -> str:
    """``virsh snapshot-list`` as a table (with ``--parent``: a Parent column).

    virsh's table layout: every cell is preceded by a space, every column but
    the last is padded to its widest cell plus two spaces, the rule has
    width + 3 dashes per column.  A root's empty Parent cell therefore leaves
    trailing spaces, exactly like virsh.  Control characters are shown as
    ``\\xNN``; wide characters count two columns.

    :param rows: the snapshots, in the order to print.
    """
    header = ["Name", "Creation Time", "State"] + (["Parent"] if parent else [])
    table = [header]
    for node in rows:
        cells = [node.name, format_creation_time(node.creation_time), node.state]
        if parent:
            cells.append(node.parent or "")
        table.append(cells)
    return render_table(header, table[1:])


def render_names(names: Sequence[str], parents: Mapping[str, str | None] | None = None) -> str:
    """``virsh snapshot-list --name`` (with ``parents``: ``--parent --name``).

    One name per line; with ``parents``, a snapshot that has a parent prints
    ``name<TAB>parent`` and a root prints its name alone.
    """
    lines = []
    for name in names:
        parent = parents.get(name) if parents is not None else None
        lines.append(f"{name}\t{parent}" if parent else name)
    return "".join(line + "\n" for line in lines)
