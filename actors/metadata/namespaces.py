"""namespaces.*: containerd's namespaces service over the metadata database."""

from __future__ import annotations

from sqlalchemy import bindparam, exists, select

from moord.actors.base import CallContext, handles
from moord.actors.metadata.common import StoreBase, ensure_namespace, mask_key, now, set_map_key, without_empty
from moord.actors.metadata.schema import (
    Prepared,
    containers,
    content,
    images,
    lease_resources,
    leases,
    namespaces,
    pack_map,
    unpack_map,
)
from moord.messages import filters
from moord.messages.base import Empty
from moord.messages.errors import AlreadyExists, FailedPrecondition, InvalidArgument, MoordError, NotFound, Unavailable
from moord.messages.namespaces import (
    CreateNamespace,
    DeleteNamespace,
    GetNamespace,
    ListNamespaces,
    NamespaceReply,
    UpdateNamespace,
)

_GET_LABELS = Prepared(select(namespaces.c.labels).where(namespaces.c.name == bindparam("name")))


def _namespace_lookup(name: str, labels: dict[str, str]) -> filters.Lookup:
    def lookup(path: list[str]) -> tuple[str, bool]:
        if path[0] == "name":
            return name, bool(name)
        if path[0] == "labels":
            return filters.map_lookup(labels, path[1:])
        return "", False

    return lookup


class NamespacesService(StoreBase):
    """Namespaces and their labels; Get of an unknown namespace answers empty labels."""

    @handles("namespaces.get")
    def get_namespace(self, req: GetNamespace, ctx: CallContext) -> dict:
        row = self.db.fetch_one(_GET_LABELS, name=req.name)
        blob = row[0] if row else None
        # ctr asks for the default snapshotter label of namespaces that may not exist yet.
        return {"namespace": {"name": req.name, "labels": unpack_map(blob) if blob is not None else {}}}

    @handles("namespaces.list")
    def list_namespaces(self, req: ListNamespaces, ctx: CallContext) -> dict:
        flt = filters.parse([req.filter] if req.filter else [])
        with self.db.read() as conn:
            rows = conn.execute(select(namespaces.c.name, namespaces.c.labels).order_by(namespaces.c.name)).all()
        found = []
        for name, blob in rows:
            labels = unpack_map(blob)
            if flt.match(_namespace_lookup(name, labels)):
                found.append({"name": name, "labels": labels})
        return {"namespaces": found}

    @handles("namespaces.create")
    def create_namespace(self, req: CreateNamespace, ctx: CallContext) -> NamespaceReply:
        name = req.namespace.name
        labels = without_empty(req.namespace.labels)
        at = now()
        with self.db.write() as conn:
            if conn.execute(select(namespaces.c.name).where(namespaces.c.name == name)).first():
                raise AlreadyExists(f'namespace "{name}": already exists')
            conn.execute(namespaces.insert().values(name=name, labels=pack_map(labels), created_at=at, updated_at=at))
        self.publish("/namespaces/create", name, {"name": name, "labels": labels})
        return NamespaceReply(namespace={"name": name, "labels": labels})

    @handles("namespaces.update")
    def update_namespace(self, req: UpdateNamespace, ctx: CallContext) -> NamespaceReply:
        name = req.namespace.name
        incoming = req.namespace.labels
        at = now()
        with self.db.write() as conn:
            blob = conn.execute(select(namespaces.c.labels).where(namespaces.c.name == name)).scalar()
            labels: dict[str, str] = unpack_map(blob) if blob is not None else {}
            if req.update_mask:
                for path in req.update_mask:
                    key = mask_key(path, "labels")
                    if key is not None:
                        set_map_key(labels, incoming, key)
                    elif path == "labels":
                        labels = without_empty(incoming)
                    else:
                        raise InvalidArgument(f'cannot update "{path}" field on namespace "{name}"')
            else:
                labels = without_empty(incoming)
            # Like containerd, updating labels of a namespace that does not exist creates it.
            ensure_namespace(conn, name, at)
            conn.execute(
                namespaces.update().where(namespaces.c.name == name).values(labels=pack_map(labels), updated_at=at)
            )
        self.publish("/namespaces/update", name, {"name": name, "labels": labels})
        return NamespaceReply(namespace={"name": name, "labels": labels})

    def _holds_snapshots(self, name: str) -> list[str]:
        """["snapshots"] when a snapshotter still keeps snapshots of the namespace (they live in
        the snapshotter's own database, so the snapshotter process is asked)."""
        client = getattr(self, "client", None)
        if client is None:
            return []
        for snapshotter in ("overlayfs", "native"):
            try:
                reply = client.call("snapshots.list", {"snapshotter": snapshotter}, namespace=name, timeout=3)
            except MoordError as exc:
                raise Unavailable(f'namespace "{name}": cannot check its snapshots: {exc.message}') from None
            if reply.get("info"):
                return ["snapshots"]
        return []

    @handles("namespaces.delete")
    def delete_namespace(self, req: DeleteNamespace, ctx: CallContext) -> Empty:
        name = req.name
        snapshots_held = self._holds_snapshots(name)
        with self.db.write() as conn:
            if not conn.execute(select(namespaces.c.name).where(namespaces.c.name == name)).first():
                raise NotFound(f'namespace "{name}": not found')
            held = [
                kind
                for kind, table in (("images", images), ("blobs", content), ("containers", containers))
                if conn.execute(select(exists().where(table.c.namespace == name))).scalar()
            ] + snapshots_held
            if held:
                raise FailedPrecondition(f'namespace "{name}" must be empty, but it still has {", ".join(held)}')
            conn.execute(lease_resources.delete().where(lease_resources.c.namespace == name))
            conn.execute(leases.delete().where(leases.c.namespace == name))
            conn.execute(namespaces.delete().where(namespaces.c.name == name))
        self.publish("/namespaces/delete", name, {"name": name})
        return Empty()
