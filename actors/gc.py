"""Garbage collection: mark and sweep over every namespace's reference graph.

The graph follows containerd's metadata/gc.go. Roots: unexpired leases, images,
containers, content and snapshots labelled `containerd.io/gc.root`, ingests younger than
their expiry. Edges: an image's target; a container's (snapshotter, snapshot key); a
lease's resources; `containerd.io/gc.ref.content[.x|/x]=<digest>` and
`containerd.io/gc.ref.snapshot.<snapshotter>[/x]=<key>` labels; a snapshot's parent; an
ingest's expected digest. Resources a `containerd.io/gc.flat` lease holds are reached
"flat": their labels are not followed (a flat snapshot's parents still are).

The pure part (`Store`, `mark`, `make_plan`, `why`) knows nothing of processes; the
GcActor feeds it. One collection: walk the snapshotters and the content store (no lock
held), then in one SQLite write transaction (metadata writes pause) load the metadata,
mark, and delete unreachable content records and expired leases; then ask the
snapshotter to remove unreachable snapshots, children first, each only if unchanged
since the walk and childless (so no parent ever loses a child's record under it), and
the content store to remove blobs no namespace owns any more and expired ingests.

The scheduler is containerd's (gc/scheduler) with its knobs in `[plugins.gc]`, plus a
timer at the next lease or ingest expiry so an idle daemon reaps them too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable

from sqlalchemy import select

from moord.actors.base import CallContext, ServiceActor, handles
from moord.actors.metadata.schema import (
    Database,
    containers,
    content,
    images,
    lease_resources,
    leases,
    unpack_map,
)
from moord.bus.client import Client
from moord.config.model import GcConfig
from moord.messages.base import Empty
from moord.messages.errors import InvalidArgument, MoordError, NotFound, Unavailable
from moord.messages.gc import GcReport, RunGc, WhyAlive, WhyReply
from moord.messages.leases import LABEL_GC_EXPIRE, LABEL_GC_FLAT, RESOURCE_CONTENT, RESOURCE_INGESTS

log = logging.getLogger(__name__)

LABEL_GC_ROOT = "containerd.io/gc.root"
LABEL_REF_CONTENT = "containerd.io/gc.ref.content"
LABEL_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
# containerd gives an ingest written without a lease 24 hours from its last writer.
INGEST_EXPIRY_SECONDS = 24 * 3600.0
# How long the collector waits for a walk or a removal by another process.
PEER_TIMEOUT = 120.0
# After a failed collection, try again this much later than the usual interval.
RETRY_DELAY = 1.0

IMAGE, CONTAINER, LEASE, CONTENT, SNAPSHOT, INGEST = "image", "container", "lease", "content", "snapshot", "ingest"


@dataclass(frozen=True, order=True)
class Node:
    """A resource of a namespace: kind, namespace, key (`<snapshotter>/<key>` for snapshots)."""

    kind: str
    namespace: str
    key: str


@dataclass
class LeaseRecord:
    """A lease's labels and the resources it holds, as (type, id)."""

    labels: dict[str, str] = field(default_factory=dict)
    resources: list[tuple[str, str]] = field(default_factory=list)

    @property
    def expires_at(self) -> float | None:
        """Its `containerd.io/gc.expire` time; an unparsable value is ignored, as containerd does."""
        return parse_rfc3339(self.labels.get(LABEL_GC_EXPIRE, ""))

    @property
    def flat(self) -> bool:
        """Whether its resources are held without following their labels."""
        return LABEL_GC_FLAT in self.labels


@dataclass
class SnapshotRecord:
    """A snapshot as walked: parent key, labels, and what detects a change since."""

    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "committed"
    id: int = 0
    updated_at: float = 0.0


@dataclass
class IngestRecord:
    """An unfinished write: the digest it expects and when it was last written."""

    expected: str = ""
    updated_at: float = 0.0


@dataclass
class Store:
    """Everything a collection looks at, keyed by (namespace, name)."""

    images: dict[tuple[str, str], tuple[str, dict[str, str]]] = field(default_factory=dict)
    containers: dict[tuple[str, str], tuple[str, str, dict[str, str]]] = field(default_factory=dict)
    leases: dict[tuple[str, str], LeaseRecord] = field(default_factory=dict)
    content: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    # key: (namespace, "<snapshotter>/<key>")
    snapshots: dict[tuple[str, str], SnapshotRecord] = field(default_factory=dict)
    ingests: dict[tuple[str, str], IngestRecord] = field(default_factory=dict)


# A reference: the node reached, whether it is reached flat, and what led to it.
Ref = tuple[Node, bool, str]


def parse_rfc3339(text: str) -> float | None:
    """An RFC 3339 time as seconds since the epoch; None when absent or unparsable."""
    if not text:
        return None
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    if "." in value:  # Go writes up to nanoseconds; Python reads microseconds
        head, _, rest = value.partition(".")
        count = len(rest) - len(rest.lstrip("0123456789"))
        digits, zone = rest[:count], rest[count:]
        value = f"{head}.{digits[:6].ljust(6, '0')}{zone}" if digits else head + zone
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def label_refs(namespace: str, labels: dict[str, str]) -> list[Ref]:
    """The content and snapshot references named by `containerd.io/gc.ref.*` labels."""
    found: list[Ref] = []
    for key in sorted(labels):
        value = labels[key]
        if not value:
            continue
        if key.startswith(LABEL_REF_CONTENT):
            rest = key[len(LABEL_REF_CONTENT):]
            # `…content`, `…content.<name>` or `…content/<name>`; not `…contentx`
            if rest == "" or rest[0] in "./":
                found.append((Node(CONTENT, namespace, value), False, f"label {key}"))
        elif key.startswith(LABEL_REF_SNAPSHOT):
            snapshotter = key[len(LABEL_REF_SNAPSHOT):].split("/", 1)[0]
            if snapshotter:
                found.append((Node(SNAPSHOT, namespace, f"{snapshotter}/{value}"), False, f"label {key}"))
    return found


def roots(store: Store, now: float) -> list[Ref]:
    """The resources certainly in use, each with why it is a root."""
    found: list[Ref] = []
    for (ns, lease_id), lease in sorted(store.leases.items()):
        expires = lease.expires_at
        if expires is None or expires > now:
            found.append((Node(LEASE, ns, lease_id), False, "root: lease"))
    for ns, name in sorted(store.images):
        found.append((Node(IMAGE, ns, name), False, "root: image"))
    for ns, cid in sorted(store.containers):
        found.append((Node(CONTAINER, ns, cid), False, "root: container"))
    for (ns, digest), labels in sorted(store.content.items()):
        if LABEL_GC_ROOT in labels:
            found.append((Node(CONTENT, ns, digest), False, f"root: label {LABEL_GC_ROOT}"))
    for (ns, key), snap in sorted(store.snapshots.items()):
        if LABEL_GC_ROOT in snap.labels:
            found.append((Node(SNAPSHOT, ns, key), False, f"root: label {LABEL_GC_ROOT}"))
    for (ns, ref), ingest in sorted(store.ingests.items()):
        if ingest.updated_at + INGEST_EXPIRY_SECONDS > now:
            found.append((Node(INGEST, ns, ref), False, "root: ingest younger than its expiry"))
    return found


def references(store: Store, node: Node, flat: bool) -> list[Ref]:
    """What `node` (reached flat or not) keeps alive."""
    ns = node.namespace
    if node.kind == IMAGE:
        target, labels = store.images[(ns, node.key)]
        return [(Node(CONTENT, ns, target), False, "target"), *label_refs(ns, labels)]
    if node.kind == CONTAINER:
        snapshotter, snapshot_key, labels = store.containers[(ns, node.key)]
        found: list[Ref] = []
        if snapshotter and snapshot_key:
            found.append((Node(SNAPSHOT, ns, f"{snapshotter}/{snapshot_key}"), False, "snapshot key"))
        return found + label_refs(ns, labels)
    if node.kind == LEASE:
        lease = store.leases[(ns, node.key)]
        held: list[Ref] = []
        for rtype, rid in sorted(lease.resources):
            if rtype == RESOURCE_CONTENT:
                held.append((Node(CONTENT, ns, rid), lease.flat, "lease resource"))
            elif rtype == RESOURCE_INGESTS:
                held.append((Node(INGEST, ns, rid), False, "lease resource"))
            elif rtype.startswith("snapshots/"):
                held.append((Node(SNAPSHOT, ns, f"{rtype.split('/', 1)[1]}/{rid}"), lease.flat, "lease resource"))
        return held
    if node.kind == CONTENT:
        labels = store.content.get((ns, node.key))
        if labels is None or flat:  # a dangling reference, or held flat
            return []
        return label_refs(ns, labels)
    if node.kind == SNAPSHOT:
        snap = store.snapshots.get((ns, node.key))
        if snap is None:
            return []
        found = []
        if snap.parent:
            snapshotter = node.key.split("/", 1)[0]
            found.append((Node(SNAPSHOT, ns, f"{snapshotter}/{snap.parent}"), flat, "parent"))
        if not flat:
            found += label_refs(ns, snap.labels)
        return found
    if node.kind == INGEST:
        ingest = store.ingests.get((ns, node.key))
        if ingest is None or not ingest.expected:
            return []
        return [(Node(CONTENT, ns, ingest.expected), False, "expected digest")]
    return []


def mark(start: Iterable[Ref], refs: Callable[[Node, bool], Iterable[Ref]]) -> dict[Node, tuple[Node | None, str]]:
    """Every node reachable from `start`, with the node it was first reached from and how.

    Breadth first, so the recorded predecessors give a shortest chain back to a root. A
    node reached flat and later not flat is visited again (its labels count then).
    """
    reached: dict[Node, tuple[Node | None, str]] = {}
    seen: set[tuple[Node, bool]] = set()
    queue: deque[tuple[Node, bool]] = deque()
    for node, flat, via in start:
        if (node, flat) not in seen:
            seen.add((node, flat))
            reached.setdefault(node, (None, via))
            queue.append((node, flat))
    while queue:
        node, flat = queue.popleft()
        for child, child_flat, via in refs(node, flat):
            if (child, child_flat) in seen:
                continue
            seen.add((child, child_flat))
            reached.setdefault(child, (node, via))
            queue.append((child, child_flat))
    return reached


@dataclass
class Plan:
    """What one collection removes, given a store and a time."""

    reached: dict[Node, tuple[Node | None, str]]
    content: list[tuple[str, str]]
    snapshots: list[tuple[str, str]]  # children before their parents
    leases: list[tuple[str, str]]
    ingests: list[tuple[str, str]]
    next_expiry: float | None


def make_plan(store: Store, now: float) -> Plan:
    """Mark from the roots; everything of the store not reached is to be removed."""
    reached = mark(roots(store, now), lambda node, flat: references(store, node, flat))

    def dead(kind: str, keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return sorted(k for k in keys if Node(kind, k[0], k[1]) not in reached)

    snapshots = dead(SNAPSHOT, store.snapshots)
    depth = {key: _depth(store, key) for key in snapshots}
    snapshots.sort(key=lambda key: (-depth[key], key))
    expiries = [
        at
        for key, lease in store.leases.items()
        if (at := lease.expires_at) is not None and at > now
    ] + [
        at for ingest in store.ingests.values() if (at := ingest.updated_at + INGEST_EXPIRY_SECONDS) > now
    ]
    return Plan(
        reached=reached,
        content=dead(CONTENT, store.content),
        snapshots=snapshots,
        leases=dead(LEASE, store.leases),
        ingests=dead(INGEST, store.ingests),
        next_expiry=min(expiries) if expiries else None,
    )


def _depth(store: Store, key: tuple[str, str]) -> int:
    """How many ancestors a snapshot has (a loop, which the snapshotter refuses, stops the count)."""
    ns, full = key
    snapshotter = full.split("/", 1)[0]
    depth, seen = 0, {full}
    snap = store.snapshots.get(key)
    while snap is not None and snap.parent:
        parent = f"{snapshotter}/{snap.parent}"
        if parent in seen:
            break
        seen.add(parent)
        depth += 1
        snap = store.snapshots.get((ns, parent))
    return depth


def why(reached: dict[Node, tuple[Node | None, str]], target: Node) -> list[tuple[Node, str]]:
    """The chain from a root down to `target` (empty when it is not reached)."""
    chain: list[tuple[Node, str]] = []
    current: Node | None = target
    while current is not None and current in reached:
        parent, via = reached[current]
        chain.append((current, via))
        current = parent
        if len(chain) > len(reached):  # cannot happen with first-reach predecessors
            break
    chain.reverse()
    return chain


# -- loading the store ----------------------------------------------------------------------


def load_metadata(conn: Any, store: Store) -> None:
    """Fill images, containers, leases and content of `store` from the metadata database."""
    for ns, name, digest, blob in conn.execute(
        select(images.c.namespace, images.c.name, images.c.digest, images.c.labels)
    ):
        store.images[(ns, name)] = (digest, unpack_map(blob))
    for ns, cid, snapshotter, key, blob in conn.execute(
        select(
            containers.c.namespace, containers.c.id, containers.c.snapshotter, containers.c.snapshot_key, containers.c.labels
        )
    ):
        store.containers[(ns, cid)] = (snapshotter, key, unpack_map(blob))
    for ns, lease_id, blob in conn.execute(select(leases.c.namespace, leases.c.id, leases.c.labels)):
        store.leases[(ns, lease_id)] = LeaseRecord(labels=unpack_map(blob))
    for ns, lease_id, rtype, rid in conn.execute(
        select(lease_resources.c.namespace, lease_resources.c.lease_id, lease_resources.c.type, lease_resources.c.resource_id)
    ):
        lease = store.leases.get((ns, lease_id))
        if lease is not None:
            lease.resources.append((rtype, rid))
    for ns, digest, blob in conn.execute(select(content.c.namespace, content.c.digest, content.c.labels)):
        store.content[(ns, digest)] = unpack_map(blob)


def load_walks(store: Store, snapshot_walk: dict[str, Any], content_walk: dict[str, Any]) -> None:
    """Fill snapshots and ingests of `store` from the snapshotter's and content store's walks."""
    for s in snapshot_walk.get("snapshots", []):
        store.snapshots[(s["namespace"], f"{s['snapshotter']}/{s['key']}")] = SnapshotRecord(
            parent=s.get("parent", ""),
            labels=dict(s.get("labels") or {}),
            kind=s.get("kind", "committed"),
            id=int(s.get("id", 0)),
            updated_at=float(s.get("updated_at", 0.0)),
        )
    for i in content_walk.get("ingests", []):
        store.ingests[(i["namespace"], i["ref"])] = IngestRecord(
            expected=i.get("expected", ""), updated_at=float(i.get("updated_at", 0.0))
        )


# -- the actor --------------------------------------------------------------------------


@dataclass
class Mutation:
    """A metadata write happened (`deleted`: it removed something; `expires_at`: a new expiry)."""

    deleted: bool = False
    expires_at: float | None = None


@dataclass
class _Tick:
    """The scheduler's timer fired."""


@dataclass
class CollectAndAnswer:
    """Collect now, then answer the waiting call (leases.delete with sync)."""

    ctx: CallContext


class GcActor(ServiceActor):
    """Serves gc.run and gc.why, and collects on containerd's schedule and at expiries."""

    def __init__(self, db_path: str, client: Client, config: GcConfig | None = None) -> None:
        super().__init__()
        # Its own connection: a collection holds SQLite's write lock while the metadata
        # actor's writes wait on their busy timeout (that wait is the pause reported).
        self.db = Database(db_path)
        self.client = client
        self.config = config or GcConfig()
        self._timer: threading.Timer | None = None
        self._last: float | None = None  # monotonic time of the last collection
        self._next: float | None = None  # monotonic time of the next scheduled one
        self._next_expiry: float | None = None  # wall time of the next lease/ingest expiry
        self._interval = 1.0
        self._gc_time = 0.0
        self._collections = 0
        self._triggered = False
        self._dirty = False
        self._deletions = 0
        self._mutations = 0

    # -- lifecycle --------------------------------------------------------------------

    def on_start(self) -> None:
        """Schedule the first collection `startup_delay` after start."""
        self._next = time.monotonic() + self.config.startup_delay
        self._arm()

    def on_stop(self) -> None:
        """Stop the timer and close the database."""
        if self._timer is not None:
            self._timer.cancel()
        self.db.close()

    # -- requests ---------------------------------------------------------------------

    @handles("gc.run")
    def run(self, req: RunGc, ctx: CallContext) -> GcReport:
        """Collect now and report."""
        return self._collect_scheduled("requested")

    @handles("gc.why")
    def why_alive(self, req: WhyAlive, ctx: CallContext) -> WhyReply:
        """The chain of references keeping a digest or `<snapshotter>/<key>` alive."""
        target = req.target
        if target.startswith("sha256:"):
            node = Node(CONTENT, ctx.namespace, target)
        elif "/" in target and target.split("/", 1)[0] and target.split("/", 1)[1]:
            node = Node(SNAPSHOT, ctx.namespace, target)
        else:
            raise InvalidArgument(f"gc why: want a digest (sha256:...) or <snapshotter>/<key>, got {target[:100]!r}")
        store = self._store()
        exists = (ctx.namespace, target) in (store.content if node.kind == CONTENT else store.snapshots)
        plan = make_plan(store, time.time())
        chain = why(plan.reached, node)
        if not chain and not exists:
            raise NotFound(f"{node.kind} {target} not found in namespace {ctx.namespace}")
        return WhyReply(
            alive=bool(chain),
            exists=exists,
            chain=[{"kind": n.kind, "key": n.key, "via": via} for n, via in chain],  # type: ignore[misc]
        )

    # -- scheduling -------------------------------------------------------------------

    def on_other(self, message: Any) -> Any:
        """Mutations, timer ticks and synchronous collections for leases.delete."""
        if isinstance(message, Mutation):
            self._on_mutation(message)
        elif isinstance(message, _Tick):
            self._on_tick()
        elif isinstance(message, CollectAndAnswer):
            try:
                self._collect_scheduled("lease deleted (sync)")
            except MoordError as exc:
                message.ctx.fail(exc)
            else:
                message.ctx.reply(Empty())
        else:
            return super().on_other(message)
        return None

    def _on_mutation(self, mutation: Mutation) -> None:
        cfg = self.config
        if mutation.expires_at is not None and (self._next_expiry is None or mutation.expires_at < self._next_expiry):
            self._next_expiry = mutation.expires_at
        if mutation.deleted:
            self._dirty = True
        # containerd counts every write after a deletion as one (its "dirty" flag).
        if self._dirty:
            self._deletions += 1
        self._mutations += 1
        now = time.monotonic()
        if (cfg.deletion_threshold > 0 and self._deletions >= cfg.deletion_threshold) or (
            self._next is None
            and (
                (cfg.deletion_threshold == 0 and self._deletions > 0)
                or (cfg.mutation_threshold > 0 and self._mutations >= cfg.mutation_threshold)
            )
        ):
            if self._next is None or self._next > now + cfg.schedule_delay:
                self._next = now + cfg.schedule_delay
        self._arm()

    def _on_tick(self) -> None:
        cfg = self.config
        now = time.monotonic()
        if cfg.reap_expired and self._next_expiry is not None and time.time() >= self._next_expiry:
            self._collect_quietly("expiry")
            return
        if self._next is None or now < self._next:
            self._arm()
            return
        idle = (
            not self._triggered
            and self._last is not None
            and self._deletions == 0
            and (cfg.mutation_threshold == 0 or self._mutations < cfg.mutation_threshold)
        )
        if idle:
            self._next = now + self._interval
            self._arm()
            return
        self._collect_quietly("scheduled")

    def _collect_quietly(self, reason: str) -> None:
        try:
            self._collect_scheduled(reason)
        except Unavailable as exc:  # a peer is (re)starting, e.g. right after daemon start
            log.info("garbage collection (%s) postponed: %s", reason, exc)
        except MoordError as exc:
            log.warning("garbage collection (%s) failed: %s", reason, exc)

    def _collect_scheduled(self, reason: str) -> GcReport:
        """Collect, then update the schedule as containerd's scheduler does."""
        try:
            report = self.collect()
        except BaseException:
            now = time.monotonic()
            self._last = now
            self._next = now + self._interval + RETRY_DELAY
            self._arm()
            raise
        log.debug("garbage collected (%s) in %.3fs", reason, report.duration_seconds)
        self._gc_time += report.pause_seconds
        self._collections += 1
        self._triggered = False
        self._dirty = False
        self._deletions = 0
        self._mutations = 0
        if self.config.pause_threshold > 0:
            average = self._gc_time / self._collections
            self._interval = max(average / self.config.pause_threshold - average, 0.001)
        now = time.monotonic()
        self._last = now
        self._next = now + self._interval
        self._arm()
        return report

    def _arm(self) -> None:
        """Set the timer for the earlier of the next collection and the next expiry."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        wakes = []
        if self._next is not None:
            wakes.append(self._next - time.monotonic())
        if self.config.reap_expired and self._next_expiry is not None:
            wakes.append(self._next_expiry - time.time() + 0.01)
        if not wakes:
            return
        delay = max(0.0, min(wakes))
        ref = self.actor_ref
        timer = threading.Timer(delay, lambda: _tell(ref, _Tick()))
        timer.daemon = True
        timer.start()
        self._timer = timer

    # -- collection -------------------------------------------------------------------

    def _walks(self) -> tuple[dict[str, Any], dict[str, Any]]:
        snapshots = self.client.call("snapshotgc.walk", {}, timeout=PEER_TIMEOUT)
        blobs = self.client.call("contentgc.walk", {}, timeout=PEER_TIMEOUT)
        return snapshots, blobs

    def _store(self) -> Store:
        """A fresh view of everything, read without pausing writes (for gc.why)."""
        snapshot_walk, content_walk = self._walks()
        store = Store()
        load_walks(store, snapshot_walk, content_walk)
        with self.db.read() as conn:
            load_metadata(conn, store)
        return store

    def collect(self) -> GcReport:
        """One collection over all namespaces (see the module docstring)."""
        started = time.monotonic()
        # Walked before the lock: what is created after the walk is simply not a candidate.
        snapshot_walk, content_walk = self._walks()
        on_disk = set(content_walk.get("blobs", []))
        paused = time.monotonic()
        with self.db.write() as conn:
            store = Store()
            load_walks(store, snapshot_walk, content_walk)
            load_metadata(conn, store)
            plan = make_plan(store, time.time())
            for ns, digest in plan.content:
                conn.execute(content.delete().where(content.c.namespace == ns, content.c.digest == digest))
            for ns, lease_id in plan.leases:
                conn.execute(
                    lease_resources.delete().where(lease_resources.c.namespace == ns, lease_resources.c.lease_id == lease_id)
                )
                conn.execute(leases.delete().where(leases.c.namespace == ns, leases.c.id == lease_id))
        pause = time.monotonic() - paused
        owned = {digest for (ns, digest) in store.content} - {digest for (ns, digest) in plan.content}
        gone = {digest for (_, digest) in plan.content} | on_disk
        report = GcReport(
            content=[{"namespace": ns, "digest": d} for ns, d in plan.content],  # type: ignore[misc]
            leases=[{"namespace": ns, "id": i} for ns, i in plan.leases],  # type: ignore[misc]
            pause_seconds=pause,
            marked=len(plan.reached),
        )
        if plan.snapshots:
            removal = self.client.call(
                "snapshotgc.remove",
                {"snapshots": [_snapshot_node(store, key) for key in plan.snapshots]},
                timeout=PEER_TIMEOUT,
            )
            report.snapshots = removal.get("removed", [])
            report.kept = removal.get("kept", [])
        blobs = sorted(d for d in gone - owned if d in on_disk)
        dead_ingests = [
            {"namespace": ns, "ref": ref, "updated_at": store.ingests[(ns, ref)].updated_at} for ns, ref in plan.ingests
        ]
        if blobs or dead_ingests:
            # The content store asks again who owns each blob before it unlinks one.
            removal = self.client.call("contentgc.remove", {"blobs": blobs, "ingests": dead_ingests}, timeout=PEER_TIMEOUT)
            report.blobs_removed = removal.get("blobs", [])
            report.ingests = removal.get("ingests", [])
        self._next_expiry = plan.next_expiry
        report.duration_seconds = time.monotonic() - started
        if report.content or report.snapshots or report.leases or report.ingests or report.blobs_removed:
            log.info(
                "gc: removed %d content records, %d blobs, %d snapshots, %d leases, %d ingests; writes paused %.1f ms",
                len(report.content),
                len(report.blobs_removed),
                len(report.snapshots),
                len(report.leases),
                len(report.ingests),
                pause * 1000,
            )
        return report


def _snapshot_node(store: Store, key: tuple[str, str]) -> dict[str, Any]:
    ns, full = key
    snapshotter, name = full.split("/", 1)
    snap = store.snapshots[key]
    return {
        "namespace": ns,
        "snapshotter": snapshotter,
        "key": name,
        "parent": snap.parent,
        "kind": snap.kind,
        "labels": snap.labels,
        "id": snap.id,
        "updated_at": snap.updated_at,
    }


def _tell(ref: Any, message: Any) -> None:
    try:
        ref.tell(message)
    except Exception:  # the actor stopped: its timer has nobody left to wake
        pass
