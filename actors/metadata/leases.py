"""leases.*: leases and the resources they hold; the lease of a request holds what it adds.

A lease is (namespace, id, labels, created_at); its resources are rows of
`lease_resources` typed `content`, `ingests` or `snapshots/<snapshotter>`, which need not
exist (containerd allows a lease to name what is yet to be written). A blob committed
under a lease (contentmeta.add carrying the request's lease) is added to the lease in a
transaction *before* the namespace's record of it, so that no collection can find the
record without the lease holding it. Deleting a blob under a lease drops it from the
lease, as containerd does.

The service also feeds the GC actor's scheduler: every metadata write is a mutation,
deletions make it dirty (containerd's RegisterMutationCallback).
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import pykka
from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from moord.actors.base import DEFERRED, Call, CallContext, handles
from moord.actors.gc import CollectAndAnswer, Mutation, parse_rfc3339
from moord.actors.metadata.common import StoreBase, ensure_namespace, now, without_empty
from moord.actors.metadata.schema import content, lease_resources, leases, pack_map, unpack_map
from moord.messages import filters
from moord.messages.base import Empty
from moord.messages.content import AddOwnership, OwnershipCheck, OwnershipDelete
from moord.messages.errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from moord.messages.gc import ContentHeld, HeldDigests
from moord.messages.leases import (
    LABEL_GC_EXPIRE,
    RESOURCE_CONTENT,
    RESOURCE_INGESTS,
    RESOURCE_SNAPSHOTS,
    AddLeaseResource,
    CreateLease,
    DeleteLease,
    DeleteLeaseResource,
    ListLeaseResources,
    ListLeases,
)

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
# Kinds whose success removes something (containerd marks its database dirty for them).
_DELETING = frozenset(
    {"images.delete", "containers.delete", "contentmeta.delete", "leases.delete", "leases.delete_resource", "namespaces.delete"}
)
_WRITING = _DELETING | frozenset(
    {
        "images.create",
        "images.update",
        "containers.create",
        "containers.update",
        "contentmeta.add",
        "contentmeta.update",
        "leases.create",
        "leases.add_resource",
        "namespaces.create",
        "namespaces.update",
    }
)


def generate_lease_id() -> str:
    """A fresh lease id, `<nanoseconds>-<random hex>` like containerd's WithRandomID."""
    return f"{time.time_ns()}-{secrets.token_hex(4)}"


def resource_key(rtype: str, rid: str) -> tuple[str, str]:
    """Validate a lease resource as containerd's parseLeaseResource: (type, id)."""
    parts = rtype.split("/")
    if parts[0] in (RESOURCE_CONTENT, RESOURCE_INGESTS):
        if len(parts) != 1:
            raise InvalidArgument(f"invalid resource type {rtype}")
        if parts[0] == RESOURCE_CONTENT and not _DIGEST_RE.match(rid):
            raise InvalidArgument(f"invalid content resource id {rid[:100]}: want sha256:<64 lowercase hex>")
        return rtype, rid
    if parts[0] == RESOURCE_SNAPSHOTS:
        if len(parts) != 2 or not parts[1]:
            raise InvalidArgument(f"invalid snapshot resource type {rtype}")
        return rtype, rid
    raise Unimplemented(f"resource type {rtype} not supported yet")


def _lease_lookup(lease: dict[str, Any]) -> filters.Lookup:
    def lookup(path: list[str]) -> tuple[str, bool]:
        if path[0] == "id":
            return lease["id"], bool(lease["id"])
        if path[0] == "labels":
            return filters.map_lookup(lease["labels"], path[1:])
        return "", False

    return lookup


class LeasesService(StoreBase):
    """Leases and their resources; composed before ContentOwnershipService, whose add and
    delete it extends with the request's lease."""

    gc: pykka.ActorRef | None

    def _lease_exists(self, conn: Any, namespace: str, lease_id: str) -> bool:
        return conn.execute(
            select(leases.c.id).where(leases.c.namespace == namespace, leases.c.id == lease_id)
        ).first() is not None

    def hold(self, namespace: str, lease_id: str, rtype: str, rid: str) -> None:
        """Make lease `lease_id` hold a resource; NotFound when there is no such lease."""
        rtype, rid = resource_key(rtype, rid)
        with self.db.write() as conn:
            if not self._lease_exists(conn, namespace, lease_id):
                raise NotFound(f'lease "{lease_id}": not found')
            stmt = sqlite_insert(lease_resources).values(
                namespace=namespace, lease_id=lease_id, type=rtype, resource_id=rid
            )
            conn.execute(stmt.on_conflict_do_nothing())

    def release(self, namespace: str, lease_id: str, rtype: str, rid: str) -> None:
        """Let lease `lease_id` stop holding a resource; NotFound when there is no such lease."""
        rtype, rid = resource_key(rtype, rid)
        with self.db.write() as conn:
            if not self._lease_exists(conn, namespace, lease_id):
                raise NotFound(f'lease "{lease_id}": not found')
            conn.execute(
                lease_resources.delete().where(
                    lease_resources.c.namespace == namespace,
                    lease_resources.c.lease_id == lease_id,
                    lease_resources.c.type == rtype,
                    lease_resources.c.resource_id == rid,
                )
            )

    @handles("leases.create")
    def create_lease(self, req: CreateLease, ctx: CallContext) -> dict:
        lease_id = req.id or generate_lease_id()
        labels = without_empty(req.labels)
        at = now()
        with self.db.write() as conn:
            if self._lease_exists(conn, ctx.namespace, lease_id):
                raise AlreadyExists(f'lease "{lease_id}": already exists')
            ensure_namespace(conn, ctx.namespace, at)
            conn.execute(
                leases.insert().values(namespace=ctx.namespace, id=lease_id, labels=pack_map(labels), created_at=at)
            )
        return {"lease": {"id": lease_id, "labels": labels, "created_at": at}}

    @handles("leases.list")
    def list_leases(self, req: ListLeases, ctx: CallContext) -> dict:
        flt = filters.parse(req.filters)
        with self.db.read() as conn:
            rows = conn.execute(
                select(leases.c.id, leases.c.labels, leases.c.created_at)
                .where(leases.c.namespace == ctx.namespace)
                .order_by(leases.c.id)
            ).all()
        found = [{"id": r.id, "labels": unpack_map(r.labels), "created_at": r.created_at} for r in rows]
        if not flt.always:
            found = [lease for lease in found if flt.match(_lease_lookup(lease))]
        return {"leases": found}

    @handles("leases.delete")
    def delete_lease(self, req: DeleteLease, ctx: CallContext) -> Any:
        with self.db.write() as conn:
            conn.execute(
                lease_resources.delete().where(
                    lease_resources.c.namespace == ctx.namespace, lease_resources.c.lease_id == req.id
                )
            )
            gone = conn.execute(
                leases.delete().where(leases.c.namespace == ctx.namespace, leases.c.id == req.id)
            ).rowcount
        if not gone:
            raise NotFound(f'lease "{req.id}": not found')
        if req.sync and self.gc is not None:
            # The GC actor answers once it has collected; this actor stays free meanwhile
            # (the content store asks it who owns a blob before removing one).
            self.gc.tell(CollectAndAnswer(ctx))
            return DEFERRED
        return Empty()

    @handles("leases.add_resource")
    def add_lease_resource(self, req: AddLeaseResource, ctx: CallContext) -> Empty:
        self.hold(ctx.namespace, req.id, req.resource.type, req.resource.id)
        return Empty()

    @handles("leases.delete_resource")
    def delete_lease_resource(self, req: DeleteLeaseResource, ctx: CallContext) -> Empty:
        self.release(ctx.namespace, req.id, req.resource.type, req.resource.id)
        return Empty()

    @handles("leases.list_resources")
    def list_lease_resources(self, req: ListLeaseResources, ctx: CallContext) -> dict:
        with self.db.read() as conn:
            if not self._lease_exists(conn, ctx.namespace, req.id):
                raise NotFound(f'lease "{req.id}": not found')
            rows = conn.execute(
                select(lease_resources.c.type, lease_resources.c.resource_id)
                .where(lease_resources.c.namespace == ctx.namespace, lease_resources.c.lease_id == req.id)
                .order_by(lease_resources.c.type, lease_resources.c.resource_id)
            ).all()
        return {"resources": [{"type": r.type, "id": r.resource_id} for r in rows]}

    # -- the request's lease holds what it writes -----------------------------------------

    @handles("contentmeta.add")
    def add_ownership(self, req: AddOwnership, ctx: CallContext) -> dict:
        """Record the blob for the namespace; under a lease, the lease holds it first."""
        if ctx.lease:
            self.hold(ctx.namespace, ctx.lease, RESOURCE_CONTENT, req.digest)
        return super().add_ownership(req, ctx)  # type: ignore[misc]

    @handles("contentmeta.check")
    def check_ownership(self, req: OwnershipCheck, ctx: CallContext) -> dict:
        """Whether the namespace owns a blob; under a lease, an owned blob is now held by it,
        as containerd leases content a writer finds already there (it is about to be used)."""
        reply = super().check_ownership(req, ctx)  # type: ignore[misc]
        if req.hold and ctx.lease and reply.get("owned"):
            self.hold(ctx.namespace, ctx.lease, RESOURCE_CONTENT, req.digest)
        return reply

    @handles("contentmeta.delete")
    def delete_ownership(self, req: OwnershipDelete, ctx: CallContext) -> dict:
        """Drop the namespace's record; under a lease, the lease lets go of the blob too."""
        reply = super().delete_ownership(req, ctx)  # type: ignore[misc]
        if ctx.lease:
            try:
                self.release(ctx.namespace, ctx.lease, RESOURCE_CONTENT, req.digest)
            except NotFound:
                pass  # the blob is gone from the namespace either way
        return reply

    @handles("gc.content_held")
    def content_held(self, req: ContentHeld, ctx: CallContext) -> HeldDigests:
        """Which of the digests some namespace owns (asked before a blob is unlinked)."""
        held: set[str] = set()
        wanted = sorted(set(req.digests))
        with self.db.read() as conn:
            for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[start : start + 500]
                held.update(conn.execute(select(content.c.digest).where(content.c.digest.in_(chunk)).distinct()).scalars())
        return HeldDigests(held=sorted(held))

    # -- the collector's scheduler hears of every write ----------------------------------

    def on_receive(self, message: Any) -> Any:
        """Serve the message, then tell the GC actor about a metadata write."""
        result = super().on_receive(message)  # type: ignore[misc]
        gc = getattr(self, "gc", None)
        if gc is not None and isinstance(message, Call) and message.ctx.kind in _WRITING:
            expires_at = None
            if message.ctx.kind == "leases.create":
                expires_at = parse_rfc3339(getattr(message.request, "labels", {}).get(LABEL_GC_EXPIRE, ""))
            try:
                gc.tell(Mutation(deleted=message.ctx.kind in _DELETING, expires_at=expires_at))
            except pykka.ActorDeadError:
                pass
        return result
