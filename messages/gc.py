"""Garbage collection: `gc.run`, `gc.why`, and the internal kinds the collector uses.

`gc.run` collects now and reports what went and how long metadata writes paused.
`gc.why` names the chain of references that keeps a blob or snapshot alive.

Internal kinds (processes talking to each other, not clients):
- `snapshotgc.walk` / `snapshotgc.remove` (snapshotter process): every snapshot of every
  namespace with parent and labels; removal children first, each only if unchanged since
  the walk and without children.
- `contentgc.walk` / `contentgc.remove` (content process): blob digests on disk and
  ingests; removal of blobs no namespace owns any more and of expired ingests.
- `gc.content_held` (metadata process): which of these digests some namespace owns.
"""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Digest, Message, request


class NamespacedDigest(Message):
    """A blob as seen from one namespace."""

    namespace: str
    digest: str


class SnapshotRef(Message):
    """A snapshot of a snapshotter in a namespace."""

    namespace: str
    snapshotter: str
    key: str


class LeaseRef(Message):
    """A lease of a namespace."""

    namespace: str
    id: str


class IngestRef(Message):
    """An ingest (unfinished write) of a namespace."""

    namespace: str
    ref: str


class KeptSnapshot(SnapshotRef):
    """A snapshot the collector meant to remove but the snapshotter kept, and why."""

    reason: str


class GcReport(Message):
    """What one collection removed, and what it cost."""

    content: list[NamespacedDigest] = Field(default_factory=list)
    snapshots: list[SnapshotRef] = Field(default_factory=list)
    leases: list[LeaseRef] = Field(default_factory=list)
    ingests: list[IngestRef] = Field(default_factory=list)
    blobs_removed: list[str] = Field(default_factory=list)
    kept: list[KeptSnapshot] = Field(default_factory=list)
    pause_seconds: float = 0.0
    duration_seconds: float = 0.0
    marked: int = 0


class ChainLink(Message):
    """One step of a reference chain: the resource, and the reference that led to it."""

    kind: str  # image, container, lease, content, snapshot, ingest
    key: str
    via: str = ""  # "root: ...", "target", "parent", "snapshot key", or the label


class WhyReply(Message):
    """Whether the resource is alive, and the chain from a root down to it."""

    alive: bool
    exists: bool
    chain: list[ChainLink] = Field(default_factory=list)


@request("gc.run", GcReport)
class RunGc(Message):
    """Collect garbage now (all namespaces)."""


@request("gc.why", WhyReply)
class WhyAlive(Message):
    """Why a resource of this namespace is kept: a digest, or `<snapshotter>/<key>`."""

    target: str = Field(min_length=1, max_length=4200)


# -- snapshotter process --------------------------------------------------------------


class SnapshotNode(Message):
    """A snapshot as the collector sees it (`id` and `updated_at` detect a change)."""

    namespace: str
    snapshotter: str
    key: str
    parent: str = ""
    kind: str
    labels: dict[str, str] = Field(default_factory=dict)
    id: int
    updated_at: float


class SnapshotWalk(Message):
    """Every snapshot of every namespace and snapshotter."""

    snapshots: list[SnapshotNode]


class SnapshotRemoval(Message):
    """What a snapshotter removed and what it kept."""

    removed: list[SnapshotRef] = Field(default_factory=list)
    kept: list[KeptSnapshot] = Field(default_factory=list)


@request("snapshotgc.walk", SnapshotWalk)
class WalkSnapshots(Message):
    """List every snapshot (all namespaces, all snapshotters)."""


@request("snapshotgc.remove", SnapshotRemoval)
class RemoveSnapshots(Message):
    """Remove snapshots in the order given (children first), each only if it is as walked
    (same id and updated_at) and has no children."""

    snapshots: list[SnapshotNode]


# -- content process ----------------------------------------------------------------


class IngestNode(Message):
    """An ingest as the collector sees it."""

    namespace: str
    ref: str
    expected: str = ""
    updated_at: float = 0.0


class ContentWalk(Message):
    """Blob digests on disk and every ingest."""

    blobs: list[str]
    ingests: list[IngestNode]


class ContentRemoval(Message):
    """What the content store removed."""

    blobs: list[str] = Field(default_factory=list)
    ingests: list[IngestRef] = Field(default_factory=list)
    bytes_freed: int = 0


@request("contentgc.walk", ContentWalk)
class WalkContent(Message):
    """List blob digests on disk and every ingest."""


@request("contentgc.remove", ContentRemoval)
class RemoveContent(Message):
    """Remove blobs no namespace owns (checked again here) and ingests not updated since
    the walk."""

    blobs: list[Digest] = Field(default_factory=list)
    ingests: list[IngestNode] = Field(default_factory=list)


class HeldDigests(Message):
    """The digests some namespace owns."""

    held: list[str]


@request("gc.content_held", HeldDigests)
class ContentHeld(Message):
    """Which of these blobs some namespace still owns."""

    digests: list[Digest] = Field(default_factory=list)

