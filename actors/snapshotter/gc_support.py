"""What the garbage collector needs of the snapshotter process, and leases for snapshots.

`SnapshotGcSupport` serves `snapshotgc.walk` (every snapshot of every namespace, with
parent, labels, id and update time) and `snapshotgc.remove` (in the order given,
children first; a snapshot changed since the walk or with a child is kept, so no
collection leaves a parent record without its child or the reverse).

`LeasedSnapshotterActor` is the snapshotter actor whose Prepare, View and Commit under
a lease (the request's `lease`) make that lease hold the new snapshot: the lease is told
*before* the snapshot exists, so no collection can see the snapshot unheld. Commit
moves the hold from the active key to the committed name and Remove drops it, as
containerd's metadata snapshotter does. The snapshotter calls the metadata process here
but the collector never calls the snapshotter while it pauses metadata writes, so the
two cannot wait on each other.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from moord.actors.base import CallContext, handles
from moord.actors.snapshotter.actor import SnapshotterActor
from moord.actors.snapshotter.backend import Snapshotter
from moord.actors.snapshotter.storage import snapshots as snapshot_table
from moord.bus.client import Client
from moord.bus.events import EventPublisher
from moord.messages.base import Empty
from moord.messages.errors import FailedPrecondition, MoordError, NotFound
from moord.messages.gc import RemoveSnapshots, SnapshotRemoval, SnapshotWalk, WalkSnapshots
from moord.messages.snapshots import CommitSnapshot, MountsReply, PrepareSnapshot, RemoveSnapshot, ViewSnapshot

log = logging.getLogger(__name__)


class SnapshotGcSupport:
    """snapshotgc.walk and snapshotgc.remove over the actor's `backends`."""

    backends: dict[str, Snapshotter]

    @handles("snapshotgc.walk")
    def gc_walk(self, req: WalkSnapshots, ctx: CallContext) -> SnapshotWalk:
        """Every snapshot of every namespace and snapshotter."""
        found: list[dict[str, Any]] = []
        for name, backend in sorted(self.backends.items()):
            with backend.store.read() as conn:
                rows = conn.execute(select(snapshot_table)).all()
            keys = {row.id: row.key for row in rows}
            for row in rows:
                found.append(
                    {
                        "namespace": row.namespace,
                        "snapshotter": name,
                        "key": row.key,
                        "parent": keys.get(row.parent_id, "") if row.parent_id is not None else "",
                        "kind": row.kind,
                        "labels": dict(row.labels or {}),
                        "id": row.id,
                        "updated_at": row.updated_at,
                    }
                )
        return SnapshotWalk(snapshots=found)  # type: ignore[arg-type]

    @handles("snapshotgc.remove")
    def gc_remove(self, req: RemoveSnapshots, ctx: CallContext) -> SnapshotRemoval:
        """Remove each snapshot, in order, that is as walked and has no children."""
        removed: list[dict[str, str]] = []
        kept: list[dict[str, str]] = []
        for item in req.snapshots:
            ref = {"namespace": item.namespace, "snapshotter": item.snapshotter, "key": item.key}
            backend = self.backends.get(item.snapshotter)
            if backend is None:
                kept.append({**ref, "reason": "snapshotter not loaded"})
                continue
            # One actor thread: nothing changes between this check and the removal.
            with backend.store.read() as conn:
                record = backend.store.find(conn, item.namespace, item.key)
                has_children = record is not None and backend.store.has_children(conn, record.id)
            if record is None:
                continue  # removed by someone else since the walk
            if record.id != item.id or record.updated_at != item.updated_at:
                kept.append({**ref, "reason": "changed since the walk"})
                continue
            if has_children:
                kept.append({**ref, "reason": "has children"})
                continue
            try:
                backend.remove(item.namespace, item.key)
            except MoordError as exc:
                kept.append({**ref, "reason": str(exc)})
                continue
            removed.append(ref)
        return SnapshotRemoval(removed=removed, kept=kept)  # type: ignore[arg-type]


class LeasedSnapshotterActor(SnapshotGcSupport, SnapshotterActor):
    """The snapshotter actor, with the request's lease holding what it creates."""

    def __init__(self, root: str, publisher: EventPublisher | None = None, metadata: Client | None = None) -> None:
        super().__init__(root, publisher)
        self.metadata = metadata

    def _lease_call(self, kind: str, ctx: CallContext, snapshotter: str, key: str) -> None:
        if not ctx.lease or self.metadata is None:
            return
        self.metadata.call(
            kind,
            {"id": ctx.lease, "resource": {"type": f"snapshots/{snapshotter}", "id": key}},
            namespace=ctx.namespace,
        )

    def _let_go(self, ctx: CallContext, snapshotter: str, key: str) -> None:
        try:
            self._lease_call("leases.delete_resource", ctx, snapshotter, key)
        except (NotFound, FailedPrecondition):
            pass  # the lease went away meanwhile: nothing holds the key either way
        except MoordError as exc:
            log.warning("lease %s still holds %s/%s: %s", ctx.lease, snapshotter, key, exc)

    @handles("snapshots.prepare")
    def prepare(self, req: PrepareSnapshot, ctx: CallContext) -> MountsReply:
        """Prepare; under a lease, the lease holds the key first."""
        self.backend(req.snapshotter)
        self._lease_call("leases.add_resource", ctx, req.snapshotter, req.key)
        return super().prepare(req, ctx)

    @handles("snapshots.view")
    def view(self, req: ViewSnapshot, ctx: CallContext) -> MountsReply:
        """View; under a lease, the lease holds the key first."""
        self.backend(req.snapshotter)
        self._lease_call("leases.add_resource", ctx, req.snapshotter, req.key)
        return super().view(req, ctx)

    @handles("snapshots.commit")
    def commit(self, req: CommitSnapshot, ctx: CallContext) -> Empty:
        """Commit; under a lease, the lease holds the name first and lets go of the key."""
        self.backend(req.snapshotter)
        self._lease_call("leases.add_resource", ctx, req.snapshotter, req.name)
        reply = super().commit(req, ctx)
        self._let_go(ctx, req.snapshotter, req.key)
        return reply

    @handles("snapshots.remove")
    def remove(self, req: RemoveSnapshot, ctx: CallContext) -> Empty:
        """Remove; under a lease, the lease lets go of the key."""
        reply = super().remove(req, ctx)
        self._let_go(ctx, req.snapshotter, req.key)
        return reply
