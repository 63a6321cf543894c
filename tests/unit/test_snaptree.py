"""The snapshot tree: libvirt's tree rules, list flags, delete flags, virsh output.

The centre piece replays libvirt's own virsh scenario (``virsh/snapshot.in``)
through :class:`SnapshotTree` and the renderers and compares the text with
``virsh/snapshot.out`` byte for byte.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtshift.errors import ErrorCode, NoDomainSnapshot, VirtError
from virtshift.model.snaptree import (
    ListFlag,
    SnapNode,
    SnapshotTree,
    format_creation_time,
    name_sort_key,
    render_list,
    render_names,
    render_tree,
)

F = ListFlag


def node(
    name: str,
    parent: str | None = None,
    *,
    t: int = 1_700_000_000,
    state: str = "running",
    external: bool = False,
    meta: bool = True,
) -> SnapNode:
    return SnapNode(
        name=name,
        parent=parent,
        creation_time=t,
        state=state,
        external=external,
        has_metadata=meta,
    )


# -- the virsh scenario ---------------------------------------------------------------


class VirshReplay:
    """Just enough of virsh to run snapshot.in against a SnapshotTree.

    The messages of the mutating verbs ("Domain snapshot s1 created", ...) are
    virsh's wording, reproduced here; the listings come from the renderers
    under test.  Like virsh's command loop, one newline follows every command.
    """

    def __init__(self) -> None:
        self.tree = SnapshotTree()
        self.clock = 1_700_000_000
        self.out: list[str] = []

    def run_script(self, lines: list[str]) -> str:
        for line in lines:
            if line.strip():
                self.run(shlex.split(line))
        return "".join(self.out)

    def run(self, argv: list[str]) -> None:
        verb, args = argv[0], argv[1:]
        try:
            self.out.append(getattr(self, "do_" + verb.replace("-", "_"))(args))
        except VirtError as err:
            self.out.append(f"error: {err.message}\n")
        self.out.append("\n")

    def do_echo(self, args: list[str]) -> str:
        return " ".join(args)

    def do_snapshot_create_as(self, args: list[str]) -> str:
        _dom, name = args
        self.clock += 1
        # A new snapshot's parent is the current one (the revert steps make fanout).
        self.tree = self.tree.add(node(name, self.tree.current, t=self.clock))
        return f"Domain snapshot {name} created"

    def do_snapshot_revert(self, args: list[str]) -> str:
        # For the tree a revert only moves "current"; the domain is not modelled.
        _dom, name = args
        self.tree = self.tree.set_current(name)
        return f"Domain snapshot {name} reverted\n"

    def do_snapshot_current(self, args: list[str]) -> str:
        _dom, arg = args
        if arg == "--name":
            try:
                return self.tree.current_node().name
            except NoDomainSnapshot:
                # virsh's own message, not the library's
                return "error: domain 'test' has no current snapshot\n"
        self.tree = self.tree.set_current(arg)
        return f"Snapshot {arg} set as current"

    def do_snapshot_delete(self, args: list[str]) -> str:
        opts = {a for a in args[1:] if a.startswith("--")}
        names = [a for a in args[1:] if not a.startswith("--")]
        name = self.tree.current_node().name if "--current" in opts else names[0]
        self.tree, _removed = self.tree.delete(
            name, children="--children" in opts, children_only="--children-only" in opts
        )
        if "--children-only" in opts:
            return f"Domain snapshot {name} children deleted\n"
        return f"Domain snapshot {name} deleted\n"

    def do_snapshot_list(self, args: list[str]) -> str:
        opts: set[str] = set()
        start = None
        it = iter(args[1:])
        for a in it:
            if a == "--from":
                start = next(it)
            else:
                opts.add(a)
        flags = 0
        for opt, bit in [
            ("--roots", F.ROOTS),
            ("--descendants", F.DESCENDANTS),
            ("--leaves", F.LEAVES),
            ("--no-leaves", F.NO_LEAVES),
            ("--topological", F.TOPOLOGICAL),
        ]:
            if opt in opts:
                flags |= bit
        if "--tree" in opts:
            return render_tree(self.tree, start=start)
        names = self.tree.list(flags, of=start)
        if "--name" in opts:
            parents = {n: self.tree.get(n).parent for n in names} if "--parent" in opts else None
            return render_names(names, parents)
        return render_list([self.tree.get(n) for n in names], parent="--parent" in opts)


@pytest.fixture
def scenario(corpus_dir: Path) -> tuple[list[str], str]:
    """snapshot.in and snapshot.out without the parts virshtshift does not replay.

    Skipped: ``checkpoint-create-as`` (checkpoints are not part of the tree) with
    its echo line and error, and the trailing ``snapshot-dumpxml`` commands (XML
    formatting belongs to the snapshot XML model, not to the tree).
    """
    script = (corpus_dir / "libvirt/virsh/snapshot.in").read_text().splitlines()
    expected = (corpus_dir / "libvirt/virsh/snapshot.out").read_text()
    script = [
        line
        for line in script
        if not line.startswith(("checkpoint-", "snapshot-dumpxml", "echo checkpoints"))
    ]
    checkpoint_part = (
        "checkpoints cannot be created while snapshots exist\n"
        "error: Operation not supported: cannot create checkpoint while snapshot exists\n\n"
    )
    assert checkpoint_part in expected
    expected = expected.replace(checkpoint_part, "")
    return script, expected[: expected.index("<domainsnapshot>")]


def test_virsh_scenario_replays_byte_for_byte(scenario: tuple[list[str], str]) -> None:
    script, expected = scenario
    assert VirshReplay().run_script(script) == expected


def test_virsh_scenario_in_pieces(scenario: tuple[list[str], str]) -> None:
    """The same replay, step by step, so a failure points at one listing."""
    script, expected = scenario
    marker = "echo Current was last one created, but we can change that"
    split = script.index(marker)
    replay = VirshReplay()
    replay.run_script(script[:split])
    tree = replay.tree
    assert render_tree(tree) == (
        "s1\n"
        "  |\n"
        "  +- s3\n"
        "  |   |\n"
        "  |   +- s2\n"
        "  |   +- s6\n"
        "  |       |\n"
        "  |       +- s4\n"
        "  |       +- s5\n"
        "  |         \n"
        "  +- s7\n"
        "      |\n"
        "      +- s8\n"
        "        \n"
    )
    assert render_tree(tree) in expected
    assert tree.current == "s8"
    tree = tree.set_current("s1")
    tree, removed = tree.delete("s1")
    assert removed == ["s1"]
    assert tree.current is None
    assert tree.list(F.ROOTS) == ["s3", "s7"]
    assert tree.list(F.LEAVES) == ["s2", "s4", "s5", "s8"]
    no_leaves = tree.list(F.NO_LEAVES)
    assert render_names(no_leaves, {n: tree.get(n).parent for n in no_leaves}) == (
        "s3\ns6\ts3\ns7\n"
    )
    assert tree.list(of="s3") == ["s2", "s6"]
    assert tree.list(F.DESCENDANTS, of="s3") == ["s2", "s4", "s5", "s6"]
    tree = tree.set_current("s4")
    tree, removed = tree.delete("s6", children_only=True)
    assert (removed, tree.current) == (["s4", "s5"], "s6")
    tree, removed = tree.delete("s7", children=True)
    assert (removed, tree.current) == (["s8", "s7"], "s6")
    tree, removed = tree.delete("s6")
    assert (removed, tree.current) == (["s6"], "s3")
    assert tree.list() == ["s2", "s3"]
    assert tree.list(F.TOPOLOGICAL) == ["s3", "s2"]
    assert replay.run_script(script[split:]) == expected


# -- building and redefining ----------------------------------------------------------


def fanout() -> SnapshotTree:
    """The scenario's tree before any deletion, current s8."""
    return SnapshotTree(
        [
            node("s1"),
            node("s3", "s1"),
            node("s2", "s3"),
            node("s6", "s3"),
            node("s5", "s6"),
            node("s4", "s6"),
            node("s7", "s1"),
            node("s8", "s7"),
        ],
        current="s8",
    )


def test_add_makes_current_by_default() -> None:
    tree = SnapshotTree().add(node("a"))
    assert tree.current == "a"
    tree = tree.add(node("b", "a"), make_current=False)
    assert tree.current == "a"
    assert tree.children("a") == ["b"]
    assert tree.get("b").parent == "a"


def test_add_duplicate_is_refused() -> None:
    tree = SnapshotTree().add(node("s1"))
    with pytest.raises(VirtError) as info:
        tree.add(node("s1"))
    assert info.value.code == ErrorCode.OPERATION_FAILED
    assert info.value.message == "operation failed: domain moment s1 already exists"


def test_add_with_unknown_parent_is_refused() -> None:
    with pytest.raises(VirtError) as info:
        SnapshotTree().add(node("s2", "s3"))
    assert info.value.code == ErrorCode.INVALID_ARG
    assert info.value.message == "invalid argument: parent s3 for moment s2 not found"


def test_trees_are_values() -> None:
    tree = fanout()
    changed = tree.add(node("x", "s8"))
    assert "x" not in tree
    assert "x" in changed
    assert tree == fanout()
    assert hash(tree) == hash(fanout())
    assert tree != changed
    assert tree != tree.set_current("s1")
    with pytest.raises(AttributeError):
        tree._current = "s1"
    with pytest.raises(TypeError):
        tree.nodes["x"] = node("x")  # type: ignore[index]
    assert len(tree) == 8
    assert list(tree) == ["s1", "s3", "s2", "s6", "s4", "s5", "s7", "s8"]


def test_redefine_in_topological_order_like_snapshot_redefine() -> None:
    # virsh/snapshot-redefine.out: s2 before its parent s3 fails, then both work.
    tree = SnapshotTree()
    with pytest.raises(VirtError) as info:
        tree.redefine(node("s2", "s3"), make_current=False)
    assert info.value.message == "invalid argument: parent s3 for moment s2 not found"
    tree = tree.redefine(node("s3"), make_current=False)
    assert tree.current is None
    tree = tree.redefine(node("s2", "s3"), make_current=True)
    assert tree.current == "s2"
    assert tree.parent_of("s2").name == "s3"


def test_redefine_own_parent() -> None:
    with pytest.raises(VirtError) as info:
        fanout().redefine(node("s3", "s3"), make_current=False)
    assert info.value.code == ErrorCode.INVALID_ARG
    assert info.value.message == "invalid argument: cannot set moment s3 as its own parent"


@pytest.mark.parametrize(
    ("name", "new_parent", "message"),
    [
        # libvirt names the ancestor of the new parent whose own parent is the node
        ("s3", "s6", "parent s6 would create cycle to s3"),
        ("s3", "s4", "parent s6 would create cycle to s3"),
        ("s1", "s5", "parent s3 would create cycle to s1"),
    ],
)
def test_redefine_cycle(name: str, new_parent: str, message: str) -> None:
    with pytest.raises(VirtError) as info:
        fanout().redefine(node(name, new_parent), make_current=False)
    assert info.value.code == ErrorCode.INVALID_ARG
    assert info.value.message == "invalid argument: " + message


def test_redefine_existing_replaces_metadata_and_keeps_children() -> None:
    tree = fanout()
    new = node("s6", "s3", t=42, state="shutoff", external=True)
    redone = tree.redefine(new, make_current=False)
    assert redone.get("s6") == new
    assert redone.children("s6") == ["s4", "s5"]
    assert redone.current == "s8"


def test_redefine_moves_a_subtree() -> None:
    redone = fanout().redefine(node("s6", "s8"), make_current=False)
    assert redone.children("s3") == ["s2"]
    assert redone.children("s8") == ["s6"]
    assert redone.descendants("s7") == ["s8", "s6", "s4", "s5"]


def test_redefine_keeps_current_of_replaced_snapshot() -> None:
    tree = fanout()
    assert tree.redefine(node("s8", "s7", t=5), make_current=False).current == "s8"
    assert tree.redefine(node("s2", "s3"), make_current=False).current == "s8"
    assert tree.redefine(node("s2", "s3"), make_current=True).current == "s2"
    assert tree.redefine(node("new"), make_current=False).current == "s8"


def test_constructor_checks_consistency() -> None:
    with pytest.raises(VirtError, match="domain moment a already exists"):
        SnapshotTree([node("a"), node("a")])
    with pytest.raises(VirtError, match="parent zz for moment a not found"):
        SnapshotTree([node("a", "zz")])
    with pytest.raises(VirtError, match="cannot set moment a as its own parent"):
        SnapshotTree([node("a", "a")])
    with pytest.raises(VirtError, match="parent b would create cycle to a") as info:
        SnapshotTree([node("r"), node("a", "b"), node("b", "a")])
    assert info.value.code == ErrorCode.INVALID_ARG
    # "a" hangs below the cycle x <-> y; the message names a member of the cycle
    with pytest.raises(VirtError, match="parent y would create cycle to x"):
        SnapshotTree([node("a", "x"), node("x", "y"), node("y", "x")])
    with pytest.raises(NoDomainSnapshot):
        SnapshotTree([node("a")], current="b")


# -- lookups -------------------------------------------------------------------------


def test_lookups_of_missing_names() -> None:
    tree = fanout()
    for call in (
        tree.get,
        tree.parent_of,
        tree.children,
        tree.descendants,
        tree.set_current,
        tree.is_leaf,
        lambda n: tree.list(of=n),
        lambda n: tree.count(of=n),
        lambda n: tree.delete(n),
        lambda n: render_tree(tree, start=n),
    ):
        with pytest.raises(NoDomainSnapshot) as info:
            call("nope")
        assert info.value.code == ErrorCode.NO_DOMAIN_SNAPSHOT
        assert int(info.value.code) == 72
        assert info.value.message == (
            "Domain snapshot not found: no domain snapshot with matching name 'nope'"
        )


def test_parent_of_root_and_no_current() -> None:
    tree = fanout()
    assert tree.parent_of("s3").name == "s1"
    with pytest.raises(NoDomainSnapshot) as info:
        tree.parent_of("s1")
    assert info.value.message == "Domain snapshot not found: snapshot 's1' does not have a parent"
    with pytest.raises(NoDomainSnapshot) as info:
        tree.set_current(None).current_node()
    assert info.value.message == (
        "Domain snapshot not found: the domain does not have a current snapshot"
    )
    assert tree.current_node().name == "s8"


def test_children_descendants_roots() -> None:
    tree = fanout()
    assert tree.roots() == ["s1"]
    assert tree.children("s1") == ["s3", "s7"]
    assert tree.children("s2") == []
    assert tree.descendants("s3") == ["s2", "s6", "s4", "s5"]
    assert tree.is_leaf("s2")
    assert not tree.is_leaf("s3")


# -- list flags ----------------------------------------------------------------------


def mixed() -> SnapshotTree:
    """A forest with every kind of snapshot.

    r1 (shutoff, internal)        r2 (disk-snapshot, external, no metadata)
     +- a (running, internal)      +- d (disk-snapshot, external)
     |   +- b (paused, external)
     +- c (shutoff, external)
    """
    return SnapshotTree(
        [
            node("r1", state="shutoff"),
            node("a", "r1"),
            node("b", "a", state="paused", external=True),
            node("c", "r1", state="shutoff", external=True),
            node("r2", state="disk-snapshot", external=True, meta=False),
            node("d", "r2", state="disk-snapshot", external=True),
        ],
        current="b",
    )


def test_flag_values_are_libvirts() -> None:
    assert [int(f) for f in (F.ROOTS, F.DESCENDANTS, F.METADATA, F.LEAVES, F.NO_LEAVES)] == [
        1,
        1,
        2,
        4,
        8,
    ]
    assert [
        int(f)
        for f in (
            F.NO_METADATA,
            F.INACTIVE,
            F.ACTIVE,
            F.DISK_ONLY,
            F.INTERNAL,
            F.EXTERNAL,
            F.TOPOLOGICAL,
        )
    ] == [16, 32, 64, 128, 256, 512, 1024]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0, ["a", "b", "c", "d", "r1", "r2"]),
        (F.ROOTS, ["r1", "r2"]),
        (F.LEAVES, ["b", "c", "d"]),
        (F.NO_LEAVES, ["a", "r1", "r2"]),
        (F.LEAVES | F.NO_LEAVES, ["a", "b", "c", "d", "r1", "r2"]),
        (F.METADATA, ["a", "b", "c", "d", "r1"]),
        (F.NO_METADATA, ["r2"]),
        (F.METADATA | F.NO_METADATA, ["a", "b", "c", "d", "r1", "r2"]),
        (F.INACTIVE, ["c", "r1"]),
        (F.ACTIVE, ["a", "b"]),
        (F.DISK_ONLY, ["d", "r2"]),
        (F.INACTIVE | F.DISK_ONLY, ["c", "d", "r1", "r2"]),
        (F.ACTIVE | F.INACTIVE, ["a", "b", "c", "r1"]),
        (F.INACTIVE | F.ACTIVE | F.DISK_ONLY, ["a", "b", "c", "d", "r1", "r2"]),
        (F.INTERNAL, ["a", "r1"]),
        (F.EXTERNAL, ["b", "c", "d", "r2"]),
        (F.INTERNAL | F.EXTERNAL, ["a", "b", "c", "d", "r1", "r2"]),
        # groups are AND-ed
        (F.LEAVES | F.EXTERNAL | F.INACTIVE, ["c"]),
        (F.ROOTS | F.EXTERNAL, ["r2"]),
        (F.ROOTS | F.NO_LEAVES | F.METADATA, ["r1"]),
        (F.NO_LEAVES | F.ACTIVE, ["a"]),
        (F.LEAVES | F.INTERNAL, []),
        (F.TOPOLOGICAL, ["r1", "a", "b", "c", "r2", "d"]),
        (F.TOPOLOGICAL | F.EXTERNAL, ["b", "c", "r2", "d"]),
        (F.TOPOLOGICAL | F.ROOTS, ["r1", "r2"]),
    ],
)
def test_list_domain_level(flags: int, expected: list[str]) -> None:
    tree = mixed()
    assert tree.list(flags) == expected
    assert tree.count(flags) == len(expected)


@pytest.mark.parametrize(
    ("of", "flags", "expected"),
    [
        ("r1", 0, ["a", "c"]),
        ("r1", F.DESCENDANTS, ["a", "b", "c"]),
        ("r1", F.DESCENDANTS | F.TOPOLOGICAL, ["a", "b", "c"]),
        ("r1", F.DESCENDANTS | F.LEAVES, ["b", "c"]),
        ("r1", F.LEAVES, ["c"]),
        ("r1", F.DESCENDANTS | F.EXTERNAL, ["b", "c"]),
        ("r1", F.DESCENDANTS | F.ACTIVE, ["a", "b"]),
        ("r1", F.INACTIVE, ["c"]),
        ("r2", F.DESCENDANTS | F.DISK_ONLY, ["d"]),
        ("r2", F.NO_METADATA, []),
        ("b", F.DESCENDANTS, []),
    ],
)
def test_list_of_a_snapshot(of: str, flags: int, expected: list[str]) -> None:
    tree = mixed()
    assert tree.list(flags, of=of) == expected
    assert tree.count(flags, of=of) == len(expected)


def test_topological_order_puts_parents_first() -> None:
    # names sort opposite to topology: z is the root, a the deepest
    tree = SnapshotTree([node("z"), node("m", "z"), node("b", "m"), node("a", "b"), node("y", "z")])
    assert tree.list() == ["a", "b", "m", "y", "z"]
    order = tree.list(F.TOPOLOGICAL)
    assert order == ["z", "m", "b", "a", "y"]
    for name in order:
        parent = tree.get(name).parent
        assert parent is None or order.index(parent) < order.index(name)
    assert tree.list(F.DESCENDANTS | F.TOPOLOGICAL, of="m") == ["b", "a"]


def test_list_order_is_virshs_case_insensitive_order() -> None:
    tree = SnapshotTree([node("b"), node("A"), node("a"), node("C"), node("_x")])
    # strcasecmp folds A-Z to a-z before comparing, so '_' (0x5f) sorts before 'A'
    assert tree.list() == ["_x", "A", "a", "b", "C"]
    assert sorted(["b", "B"], key=name_sort_key) == ["B", "b"]


@pytest.mark.parametrize("bad", [2048, 4096, 1 << 31, 2048 | 1])
def test_unknown_list_flags(bad: int) -> None:
    tree = mixed()
    with pytest.raises(VirtError) as info:
        tree.list(bad)
    assert info.value.code == ErrorCode.INVALID_ARG
    assert info.value.message.startswith("invalid argument: unsupported flags (0x")
    assert "virDomainSnapshotListNames" in info.value.message
    with pytest.raises(VirtError, match="virDomainSnapshotNumChildren"):
        tree.count(bad, of="r1")
    with pytest.raises(VirtError, match=r"unsupported flags \(0x800\)"):
        tree.list(2048 | 1, of="r1")


def test_list_empty_tree() -> None:
    tree = SnapshotTree()
    assert tree.list() == []
    assert tree.count(F.ROOTS) == 0
    assert render_tree(tree) == ""


# -- delete --------------------------------------------------------------------------


def test_delete_reparents_children_to_the_parent() -> None:
    tree, removed = fanout().delete("s3")
    assert removed == ["s3"]
    assert tree.children("s1") == ["s2", "s6", "s7"]
    assert tree.get("s2").parent == "s1"
    assert tree.get("s6").parent == "s1"
    assert tree.children("s6") == ["s4", "s5"]
    assert tree.current == "s8"


def test_delete_root_with_children_makes_them_roots() -> None:
    tree, removed = fanout().set_current("s1").delete("s1")
    assert removed == ["s1"]
    assert tree.roots() == ["s3", "s7"]
    assert tree.get("s3").parent is None
    assert tree.current is None


def test_delete_current_moves_current_to_parent() -> None:
    tree, _ = fanout().set_current("s6").delete("s6")
    assert tree.current == "s3"
    assert tree.children("s3") == ["s2", "s4", "s5"]


def test_delete_children_removes_subtree_deepest_first() -> None:
    tree, removed = fanout().delete("s3", children=True)
    assert removed == ["s2", "s4", "s5", "s6", "s3"]
    assert list(tree) == ["s1", "s7", "s8"]
    assert tree.current == "s8"


def test_delete_children_with_current_inside_moves_current_to_parent() -> None:
    tree, _ = fanout().set_current("s4").delete("s3", children=True)
    assert tree.current == "s1"
    tree, _ = fanout().set_current("s4").delete("s1", children=True)
    assert tree.current is None
    assert len(tree) == 0


def test_delete_children_only() -> None:
    tree, removed = fanout().set_current("s5").delete("s3", children_only=True)
    assert removed == ["s2", "s4", "s5", "s6"]
    assert list(tree) == ["s1", "s3", "s7", "s8"]
    assert tree.current == "s3"
    # current outside the subtree stays; the named snapshot itself stays
    tree, removed = fanout().set_current("s3").delete("s3", children_only=True)
    assert tree.current == "s3"
    assert "s3" in tree
    # a leaf has nothing to remove
    same, removed = fanout().delete("s2", children_only=True)
    assert (same, removed) == (fanout(), [])


def test_delete_leaf_with_children_flag() -> None:
    tree, removed = fanout().delete("s8", children=True)
    assert removed == ["s8"]
    assert tree.current == "s7"


def test_delete_removed_order_is_safe_for_data() -> None:
    tree = fanout()
    _, removed = tree.delete("s1", children=True)
    for i, name in enumerate(removed):
        # every descendant of `name` was removed before it
        assert set(tree.descendants(name)) <= set(removed[:i])


def test_delete_both_children_flags_is_invalid() -> None:
    with pytest.raises(VirtError) as info:
        fanout().delete("s3", children=True, children_only=True)
    assert info.value.code == ErrorCode.INVALID_ARG
    assert "mutually exclusive" in info.value.message
    # checked before the lookup, like libvirt checks flags first
    with pytest.raises(VirtError, match="mutually exclusive"):
        fanout().delete("nope", children=True, children_only=True)


def test_delete_leaves_original_untouched() -> None:
    tree = fanout()
    tree.delete("s3")
    assert tree == fanout()
    assert tree.get("s2").parent == "s3"


# -- renderers -----------------------------------------------------------------------


def test_render_tree_shapes() -> None:
    assert render_tree(SnapshotTree([node("solo")])) == "solo\n\n"
    two_roots = SnapshotTree([node("b"), node("a"), node("c", "a")])
    assert render_tree(two_roots) == "a\n  |\n  +- c\n    \nb\n\n"
    assert render_tree(fanout(), start="s6") == "s6\n  |\n  +- s4\n  +- s5\n    \n"
    deep = SnapshotTree([node("r"), node("x", "r"), node("y", "x"), node("z", "r")])
    assert render_tree(deep) == ("r\n  |\n  +- x\n  |   |\n  |   +- y\n  |     \n  +- z\n    \n")


@pytest.fixture
def utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.mark.usefixtures("utc")
def test_render_list_table() -> None:
    rows = [node("s2", "s3", t=1_270_477_159), node("s3", t=0, state="disk-snapshot")]
    assert render_list(rows) == (
        " Name   Creation Time               State\n"
        "---------------------------------------------------\n"
        " s2     2010-04-05 14:19:19 +0000   running\n"
        " s3     1970-01-01 00:00:00 +0000   disk-snapshot\n"
    )
    # Parent column: a root's empty cell leaves virsh's trailing spaces
    assert render_list(rows, parent=True) == (
        " Name   Creation Time               State           Parent\n"
        + "-" * (4 + 25 + 13 + 6 + 4 * 3)
        + "\n"
        " s2     2010-04-05 14:19:19 +0000   running         s3\n"
        " s3     1970-01-01 00:00:00 +0000   disk-snapshot   \n"
    )


def test_render_list_empty() -> None:
    assert render_list([]) == " Name   Creation Time   State\n-------------------------------\n"
    assert render_list([], parent=True) == (
        " Name   Creation Time   State   Parent\n----------------------------------------\n"
    )


def test_render_list_escapes_and_wide_characters() -> None:
    rows = [dataclasses.replace(node("a\tb"), creation_time=0), node("快照", t=0)]
    text = render_list(rows)
    lines = text.splitlines()
    assert lines[2].startswith(" a\\x09b   ")
    # the escaped name takes 6 columns, the wide one 4: both padded to 6 (+2)
    assert lines[3].startswith(" 快照     1970")
    assert lines[1] == "-" * (6 + 25 + 7 + 3 * 3)


def test_format_creation_time_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert format_creation_time(0) == "1970-01-01 05:30:00 +0530"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_render_names() -> None:
    assert render_names(["s2", "s3"]) == "s2\ns3\n"
    assert render_names([]) == ""
    assert render_names(["s3", "s6"], {"s3": None, "s6": "s3"}) == "s3\ns6\ts3\n"


def test_tree_of_a_very_long_chain() -> None:
    """A chain deeper than Python's recursion limit renders and walks."""
    nodes = [
        SnapNode(name=f"s{i:04d}", parent=f"s{i - 1:04d}" if i else None, creation_time=i,
                 state="disk-snapshot", external=True)
        for i in range(2500)
    ]  # fmt: skip
    tree = SnapshotTree(nodes, current="s2499")
    lines = render_tree(tree).splitlines()
    assert lines[0] == "s0000"
    assert lines[-2].strip() == "+- s2499"
    assert len(lines) == 2 * 2500
    assert tree.list(1024)[-1] == "s2499"
    assert len(tree.descendants("s0000")) == 2499
