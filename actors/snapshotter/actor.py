"""The snapshotter actor: serves every snapshots.* kind for the overlayfs and native backends.

Keys are per namespace (the request's namespace); the request's `snapshotter` field picks
the backend. Labels: containerd keeps all labels in its metadata store and hands only
the inherited ones (`containerd.io/snapshot/*`, `containerd.io/snapshot.ref`) to the
backend, then shows the union; one store per snapshotter here keeps every label of a
snapshot, which is that same union. Commit replaces labels by the commit's own, as
containerd does. Prepare/View with `containerd.io/snapshot.ref=<target>` answers
AlreadyExists when <target> exists (containerd's unpacker relies on it).
"""

from __future__ import annotations

import logging
from typing import Callable

from moord.actors.base import CallContext, ServiceActor, handles
from moord.actors.snapshotter.backend import Snapshotter
from moord.actors.snapshotter.native import NativeSnapshotter
from moord.actors.snapshotter.overlay import OverlaySnapshotter
from moord.actors.snapshotter.storage import SnapshotRecord
from moord.bus.events import EventPublisher
from moord.messages import events, filters
from moord.messages.base import Empty, Message
from moord.messages.errors import InvalidArgument
from moord.messages.snapshots import (
    CleanupSnapshots,
    CommitSnapshot,
    ListSnapshots,
    MountsReply,
    PrepareSnapshot,
    RemoveSnapshot,
    SnapshotInfo,
    SnapshotList,
    SnapshotMounts,
    SnapshotReply,
    SnapshotUsage,
    StatSnapshot,
    UpdateSnapshot,
    UsageReply,
    ViewSnapshot,
)

log = logging.getLogger(__name__)

BACKENDS: dict[str, type[Snapshotter]] = {
    OverlaySnapshotter.name: OverlaySnapshotter,
    NativeSnapshotter.name: NativeSnapshotter,
}


def info_of(record: SnapshotRecord) -> SnapshotInfo:
    """The wire view of a snapshot record."""
    return SnapshotInfo(
        name=record.key,
        parent=record.parent,
        kind=record.kind,  # type: ignore[arg-type]
        created_at=record.created_at,
        updated_at=record.updated_at,
        labels=dict(record.labels),
    )


def _lookup(info: SnapshotInfo) -> Callable[[list[str]], tuple[str, bool]]:
    """Field paths of a snapshot for filters, as containerd's adaptSnapshot: kind, name, parent, labels.<key>."""

    def lookup(fieldpath: list[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "kind":
            return info.kind, True
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            return filters.map_lookup(info.labels, fieldpath[1:])
        return "", False

    return lookup


class SnapshotterActor(ServiceActor):
    """Serves snapshots.* for all snapshotters under one root."""

    def __init__(self, root: str, publisher: EventPublisher | None = None) -> None:
        super().__init__()
        self.backends: dict[str, Snapshotter] = {name: cls(root) for name, cls in BACKENDS.items()}
        self.publisher = publisher

    def on_stop(self) -> None:
        """Close the databases."""
        for backend in self.backends.values():
            backend.close()

    def backend(self, name: str) -> Snapshotter:
        """The snapshotter called `name`; InvalidArgument as containerd for others."""
        if not name:
            raise InvalidArgument("snapshotter argument missing")
        found = self.backends.get(name)
        if found is None:
            raise InvalidArgument(f"snapshotter not loaded: {name} (have {', '.join(sorted(self.backends))})")
        return found

    def _publish(self, topic: str, namespace: str, event: Message) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish(topic, namespace, event)
        except Exception:  # the change is made: a lost event must not fail the request
            log.exception("publishing %s failed", topic)

    @handles("snapshots.prepare")
    def prepare(self, req: PrepareSnapshot, ctx: CallContext) -> MountsReply:
        """Create active snapshot `key` on committed `parent`."""
        mounts = self.backend(req.snapshotter).create(ctx.namespace, "active", req.key, req.parent, req.labels)
        self._publish(
            "/snapshot/prepare",
            ctx.namespace,
            events.SnapshotPrepare(key=req.key, parent=req.parent, snapshotter=req.snapshotter),
        )
        return MountsReply(mounts=mounts)

    @handles("snapshots.view")
    def view(self, req: ViewSnapshot, ctx: CallContext) -> MountsReply:
        """Create read-only view `key` of committed `parent` (containerd publishes no event)."""
        mounts = self.backend(req.snapshotter).create(ctx.namespace, "view", req.key, req.parent, req.labels)
        return MountsReply(mounts=mounts)

    @handles("snapshots.mounts")
    def mounts(self, req: SnapshotMounts, ctx: CallContext) -> MountsReply:
        """Mounts of an active snapshot or view."""
        return MountsReply(mounts=self.backend(req.snapshotter).mounts(ctx.namespace, req.key))

    @handles("snapshots.commit")
    def commit(self, req: CommitSnapshot, ctx: CallContext) -> Empty:
        """Commit active `key` as `name`."""
        self.backend(req.snapshotter).commit(ctx.namespace, req.name, req.key, req.labels)
        self._publish(
            "/snapshot/commit",
            ctx.namespace,
            events.SnapshotCommit(key=req.key, name=req.name, snapshotter=req.snapshotter),
        )
        return Empty()

    @handles("snapshots.remove")
    def remove(self, req: RemoveSnapshot, ctx: CallContext) -> Empty:
        """Remove a snapshot that has no children."""
        self.backend(req.snapshotter).remove(ctx.namespace, req.key)
        self._publish(
            "/snapshot/remove", ctx.namespace, events.SnapshotRemove(key=req.key, snapshotter=req.snapshotter)
        )
        return Empty()

    @handles("snapshots.stat")
    def stat(self, req: StatSnapshot, ctx: CallContext) -> SnapshotReply:
        """Info of one snapshot."""
        return SnapshotReply(info=info_of(self.backend(req.snapshotter).stat(ctx.namespace, req.key)))

    @handles("snapshots.update")
    def update(self, req: UpdateSnapshot, ctx: CallContext) -> SnapshotReply:
        """Update labels (only labels are mutable)."""
        record = self.backend(req.snapshotter).update(ctx.namespace, req.info.name, req.info.labels, req.update_mask)
        return SnapshotReply(info=info_of(record))

    @handles("snapshots.list")
    def list_snapshots(self, req: ListSnapshots, ctx: CallContext) -> SnapshotList:
        """Snapshots of the namespace matching any of the filters."""
        selected = filters.parse(req.filters)  # parse errors: InvalidArgument before any work
        infos = [info_of(r) for r in self.backend(req.snapshotter).list_snapshots(ctx.namespace)]
        return SnapshotList(info=[i for i in infos if selected.match(_lookup(i))])

    @handles("snapshots.usage")
    def usage(self, req: SnapshotUsage, ctx: CallContext) -> UsageReply:
        """Bytes and inodes of the snapshot itself."""
        size, inodes = self.backend(req.snapshotter).usage(ctx.namespace, req.key)
        return UsageReply(size=size, inodes=inodes)

    @handles("snapshots.cleanup")
    def cleanup(self, req: CleanupSnapshots, ctx: CallContext) -> Empty:
        """Remove on-disk directories that no record owns."""
        self.backend(req.snapshotter).cleanup()
        return Empty()
