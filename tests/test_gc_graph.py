"""The collector's pure mark and plan on random reference graphs (hypothesis).

Each generated store comes with its edges written down as they were generated; an
independent fixed-point closure over those edges is the oracle. Nothing reachable may be
planned for removal, everything unreachable must be, and snapshots go children first.
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from moord.actors.gc import (
    CONTAINER,
    CONTENT,
    IMAGE,
    INGEST,
    INGEST_EXPIRY_SECONDS,
    LEASE,
    SNAPSHOT,
    IngestRecord,
    LeaseRecord,
    Node,
    SnapshotRecord,
    Store,
    label_refs,
    make_plan,
    mark,
    parse_rfc3339,
    why,
)

NOW = 1_700_000_000.0
NAMESPACES = ("default", "k8s.io")


def digest(i: int) -> str:
    """A valid digest for content number i."""
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


# -- mark on an arbitrary graph -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=30).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=80),
            st.sets(st.integers(0, n - 1), max_size=5),
        )
    )
)
def test_mark_reaches_exactly_the_closure(graph: tuple[int, list[tuple[int, int]], set[int]]) -> None:
    """mark() reaches every node a path leads to from a root, and nothing else."""
    n, edges, root_ids = graph
    nodes = [Node(CONTENT, "default", digest(i)) for i in range(n)]
    adjacency: dict[Node, list[Node]] = {}
    for a, b in edges:
        adjacency.setdefault(nodes[a], []).append(nodes[b])
    reached = mark(
        [(nodes[r], False, "root") for r in sorted(root_ids)],
        lambda node, flat: [(child, False, "edge") for child in adjacency.get(node, [])],
    )
    closure = {nodes[r] for r in root_ids}
    while True:
        grown = closure | {b for a in closure for b in adjacency.get(a, [])}
        if grown == closure:
            break
        closure = grown
    assert set(reached) == closure
    for node in closure:  # every chain starts at a root and follows real edges
        chain = why(reached, node)
        assert chain[0][0] in {nodes[r] for r in root_ids}
        assert chain[-1][0] == node
        for (parent, _), (child, _) in zip(chain, chain[1:]):
            assert child in adjacency.get(parent, [])


# -- plan on random stores ---------------------------------------------------------------


@st.composite
def stores(draw: st.DrawFn) -> tuple[Store, dict[tuple[Node, bool], set[tuple[Node, bool]]], set[tuple[Node, bool]]]:
    """A random store, its edges as generated (per (node, flat)) and its roots."""
    store = Store()
    edges: dict[tuple[Node, bool], set[tuple[Node, bool]]] = {}
    roots: set[tuple[Node, bool]] = set()

    def edge(a: Node, a_flat: bool, b: Node, b_flat: bool) -> None:
        edges.setdefault((a, a_flat), set()).add((b, b_flat))

    for ns in NAMESPACES:
        n_content = draw(st.integers(0, 8))
        n_snaps = draw(st.integers(0, 8))
        snap_names = [f"overlayfs/s{i}" for i in range(n_snaps)]
        contents = [digest(draw(st.integers(0, 12))) for _ in range(n_content)]
        contents = sorted(set(contents))
        # a dangling reference target that has no record
        targets = contents + [digest(99)]
        for d in contents:
            labels: dict[str, str] = {}
            for j, t in enumerate(draw(st.lists(st.sampled_from(targets), max_size=3))):
                style = draw(st.sampled_from([".l.", "/", "."]))
                labels[f"containerd.io/gc.ref.content{style}{j}"] = t
            if snap_names and draw(st.booleans()):
                labels["containerd.io/gc.ref.snapshot.overlayfs"] = draw(st.sampled_from(snap_names))[len("overlayfs/"):]
            if draw(st.integers(0, 9)) == 0:
                labels["containerd.io/gc.root"] = "2023-01-01T00:00:00Z"
            labels["containerd.io/gc.ref.contentx"] = digest(98)  # not a reference: no separator
            store.content[(ns, d)] = labels
            node = Node(CONTENT, ns, d)
            for key, value in labels.items():
                if key.startswith("containerd.io/gc.ref.content") and key != "containerd.io/gc.ref.contentx":
                    edge(node, False, Node(CONTENT, ns, value), False)
                elif key.startswith("containerd.io/gc.ref.snapshot."):
                    edge(node, False, Node(SNAPSHOT, ns, "overlayfs/" + value), False)
                elif key == "containerd.io/gc.root":
                    roots.add((node, False))
        for i, name in enumerate(snap_names):
            parent = draw(st.sampled_from([""] + [s[len("overlayfs/"):] for s in snap_names[:i]]))
            labels = {}
            if contents and draw(st.booleans()):
                labels["containerd.io/gc.ref.content.x"] = draw(st.sampled_from(contents))
            if draw(st.integers(0, 9)) == 0:
                labels["containerd.io/gc.root"] = "x"
            store.snapshots[(ns, name)] = SnapshotRecord(parent=parent, labels=labels, id=i + 1, updated_at=1.0)
            node = Node(SNAPSHOT, ns, name)
            for flat in (False, True):
                if parent:
                    edge(node, flat, Node(SNAPSHOT, ns, "overlayfs/" + parent), flat)
            if "containerd.io/gc.ref.content.x" in labels:
                edge(node, False, Node(CONTENT, ns, labels["containerd.io/gc.ref.content.x"]), False)
            if "containerd.io/gc.root" in labels:
                roots.add((node, False))
        for i in range(draw(st.integers(0, 2))):
            target = draw(st.sampled_from(targets))
            store.images[(ns, f"img{i}")] = (target, {})
            node = Node(IMAGE, ns, f"img{i}")
            roots.add((node, False))
            edge(node, False, Node(CONTENT, ns, target), False)
        for i in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from(snap_names + ["overlayfs/missing"]))
            store.containers[(ns, f"c{i}")] = ("overlayfs", key.split("/", 1)[1], {})
            node = Node(CONTAINER, ns, f"c{i}")
            roots.add((node, False))
            edge(node, False, Node(SNAPSHOT, ns, key), False)
        for i in range(draw(st.integers(0, 3))):
            expired = draw(st.booleans())
            flat = draw(st.booleans())
            labels = {"containerd.io/gc.expire": "2000-01-01T00:00:00Z" if expired else "2100-01-01T00:00:00.123456789Z"}
            if flat:
                labels["containerd.io/gc.flat"] = ""
            lease = LeaseRecord(labels=labels)
            node = Node(LEASE, ns, f"l{i}")
            if not expired:
                roots.add((node, False))
            for d in draw(st.lists(st.sampled_from(targets), max_size=3)):
                lease.resources.append(("content", d))
                edge(node, False, Node(CONTENT, ns, d), flat)
            for s in draw(st.lists(st.sampled_from(snap_names or ["overlayfs/none"]), max_size=2)):
                lease.resources.append(("snapshots/overlayfs", s.split("/", 1)[1]))
                edge(node, False, Node(SNAPSHOT, ns, s), flat)
            store.leases[(ns, f"l{i}")] = lease
        for i in range(draw(st.integers(0, 2))):
            young = draw(st.booleans())
            expected = draw(st.sampled_from(targets + [""]))
            store.ingests[(ns, f"ref{i}")] = IngestRecord(
                expected=expected, updated_at=NOW - (10 if young else INGEST_EXPIRY_SECONDS + 10)
            )
            node = Node(INGEST, ns, f"ref{i}")
            if young:
                roots.add((node, False))
            if expected:
                edge(node, False, Node(CONTENT, ns, expected), False)
    return store, edges, roots


def _oracle(edges: dict[tuple[Node, bool], set[tuple[Node, bool]]], roots: set[tuple[Node, bool]]) -> set[Node]:
    reached = set(roots)
    while True:
        grown = reached | {b for a in reached for b in edges.get(a, set())}
        if grown == reached:
            return {node for node, _ in reached}
        reached = grown


@settings(max_examples=300, deadline=None)
@given(stores())
def test_plan_removes_exactly_the_unreachable(case: tuple[Store, dict, set]) -> None:
    """Nothing reachable is removed; everything unreachable is; children before parents."""
    store, edges, roots = case
    plan = make_plan(store, NOW)
    alive = _oracle(edges, roots)
    assert set(plan.reached) == alive
    assert set(plan.content) == {k for k in store.content if Node(CONTENT, *k) not in alive}
    assert set(plan.snapshots) == {k for k in store.snapshots if Node(SNAPSHOT, *k) not in alive}
    assert set(plan.leases) == {k for k in store.leases if Node(LEASE, *k) not in alive}
    assert set(plan.ingests) == {k for k in store.ingests if Node(INGEST, *k) not in alive}
    position = {key: i for i, key in enumerate(plan.snapshots)}
    for (ns, name), snap in store.snapshots.items():
        if not snap.parent:
            continue
        parent = (ns, "overlayfs/" + snap.parent)
        if (ns, name) not in position:
            # a kept child keeps its parent: never a child without its parent record
            assert parent not in position
        elif parent in position:
            assert position[(ns, name)] < position[parent]


def test_label_refs_follow_containerd_prefixes() -> None:
    """`content`, `content.x`, `content/x` are references; `contentx` is not; snapshotter ends at '/'."""
    refs = label_refs(
        "ns",
        {
            "containerd.io/gc.ref.content": "a",
            "containerd.io/gc.ref.content.m.0": "b",
            "containerd.io/gc.ref.content/x": "c",
            "containerd.io/gc.ref.contentx": "d",
            "containerd.io/gc.ref.snapshot.overlayfs": "k1",
            "containerd.io/gc.ref.snapshot.native/x": "k2",
            "unrelated": "e",
        },
    )
    assert {n for n, _, _ in refs} == {
        Node(CONTENT, "ns", "a"),
        Node(CONTENT, "ns", "b"),
        Node(CONTENT, "ns", "c"),
        Node(SNAPSHOT, "ns", "overlayfs/k1"),
        Node(SNAPSHOT, "ns", "native/k2"),
    }


def test_rfc3339_as_go_writes_it() -> None:
    """Nanosecond fractions, Z and offsets parse; garbage does not."""
    assert parse_rfc3339("2024-01-02T03:04:05Z") == 1704164645.0
    assert abs(parse_rfc3339("2024-01-02T03:04:05.123456789Z") - 1704164645.123456) < 1e-6  # type: ignore[operator]
    assert parse_rfc3339("2024-01-02T04:04:05+01:00") == 1704164645.0
    assert parse_rfc3339("tomorrow") is None
    assert parse_rfc3339("2024-01-02T03:04:05") is None
