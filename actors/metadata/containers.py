"""containers.*: container records per namespace (hot path: get and filtered list)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, bindparam, select

from moord.actors.base import CallContext, handles
from moord.actors.metadata.common import StoreBase, ensure_namespace, mask_key, now, set_map_key, without_empty
from moord.actors.metadata.query import prefilter
from moord.actors.metadata.schema import EMPTY_MAP, Prepared, container_labels, containers, pack_map, unpack_map
from moord.messages import filters
from moord.messages.base import Empty
from moord.messages.errors import AlreadyExists, InvalidArgument, NotFound
from moord.messages.containers import CreateContainer, DeleteContainer, GetContainer, ListContainers, UpdateContainer

_COLUMNS = (
    containers.c.id,
    containers.c.labels,
    containers.c.image,
    containers.c.runtime_name,
    containers.c.runtime_options,
    containers.c.spec,
    containers.c.snapshotter,
    containers.c.snapshot_key,
    containers.c.extensions,
    containers.c.created_at,
    containers.c.updated_at,
)
# Fields an update without mask replaces (containerd's list; snapshotter and runtime
# are immutable). "snapshot_key" is accepted as a spelling of containerd's "snapshotkey".
_DEFAULT_MASK = ("labels", "spec", "extensions", "image", "snapshotkey")
_GET = Prepared(
    select(*_COLUMNS).where(containers.c.namespace == bindparam("ns"), containers.c.id == bindparam("id"))
)
# Fieldpaths that are plain columns ("" = absent), for SQL pushdown of filters.
_FILTER_COLUMNS = {
    ("id",): containers.c.id,
    ("image",): containers.c.image,
    ("runtime", "name"): containers.c.runtime_name,
    ("snapshotter",): containers.c.snapshotter,
}


def _unpack(blob: bytes) -> Any:
    return {} if blob == EMPTY_MAP else unpack_map(blob)


def _container_dict(row: Any) -> dict[str, Any]:
    # Built straight from the row: the reply is packed as is, without a pydantic pass.
    return {
        "id": row[0],
        "labels": _unpack(row[1]),
        "image": row[2],
        "runtime": {"name": row[3], "options": unpack_map(row[4])},
        "spec": row[5],
        "snapshotter": row[6],
        "snapshot_key": row[7],
        "extensions": _unpack(row[8]),
        "created_at": row[9],
        "updated_at": row[10],
    }


_FILTER_VIEW_COLUMNS = (
    containers.c.id,
    containers.c.labels,
    containers.c.image,
    containers.c.runtime_name,
    containers.c.snapshotter,
)


def _filter_view(row: Any) -> dict[str, Any]:
    """The fields filters can name, from a row of _FILTER_VIEW_COLUMNS."""
    return {"id": row[0], "labels": _unpack(row[1]), "image": row[2], "runtime": {"name": row[3]}, "snapshotter": row[4]}


def _has_label(namespace: str) -> Any:
    def has_label(key: str, value: str | None) -> ColumnElement[bool]:
        owners = select(container_labels.c.id).where(
            container_labels.c.namespace == namespace, container_labels.c.key == key
        )
        if value is not None:
            owners = owners.where(container_labels.c.value == value)
        return containers.c.id.in_(owners)

    return has_label


def _write_labels(conn: Any, namespace: str, container_id: str, labels: dict[str, str]) -> None:
    conn.execute(
        container_labels.delete().where(
            container_labels.c.namespace == namespace, container_labels.c.id == container_id
        )
    )
    if labels:
        conn.execute(
            container_labels.insert(),
            [{"namespace": namespace, "id": container_id, "key": k, "value": v} for k, v in labels.items()],
        )


def container_lookup(container: dict[str, Any]) -> filters.Lookup:
    """Filter fields of a container: id, image, runtime.name, snapshotter, labels."""

    def lookup(path: list[str]) -> tuple[str, bool]:
        head = path[0]
        if head in ("id", "image", "snapshotter"):
            value = container[head]
            return value, bool(value)
        if head == "runtime":
            if len(path) > 1 and path[1] == "name":
                name = container["runtime"]["name"]
                return name, bool(name)
            return "", False
        if head == "labels":
            return filters.map_lookup(container["labels"], path[1:])
        return "", False

    return lookup


def _validate(container: dict[str, Any]) -> None:
    if any(key == "" for key in container["extensions"]):
        raise InvalidArgument("container.Extension keys must not be zero-length")
    if not container["runtime"]["name"]:
        raise InvalidArgument("container.Runtime.Name must be set")
    if not container["spec"]:
        raise InvalidArgument("container.Spec must be set")
    if container["snapshot_key"] and not container["snapshotter"]:
        raise InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")


def _columns(container: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": container["id"],
        "labels": pack_map(container["labels"]),
        "image": container["image"],
        "runtime_name": container["runtime"]["name"],
        "runtime_options": pack_map(container["runtime"]["options"]),
        "spec": container["spec"],
        "snapshotter": container["snapshotter"],
        "snapshot_key": container["snapshot_key"],
        "extensions": pack_map(container["extensions"]),
        "created_at": container["created_at"],
        "updated_at": container["updated_at"],
    }


class ContainersService(StoreBase):
    """Container records: create, get, list (filters), update (masks), delete."""

    def _fetch_container(self, namespace: str, container_id: str) -> dict[str, Any] | None:
        # One statement: its own read snapshot, inside a write transaction too.
        row = self.db.fetch_one(_GET, ns=namespace, id=container_id)
        return _container_dict(row) if row else None

    @handles("containers.get")
    def get_container(self, req: GetContainer, ctx: CallContext) -> dict:
        container = self._fetch_container(ctx.namespace, req.id)
        if container is None:
            raise NotFound(f'container "{req.id}" in namespace "{ctx.namespace}": not found')
        return {"container": container}

    @handles("containers.list")
    def list_containers(self, req: ListContainers, ctx: CallContext) -> dict:
        flt = filters.parse(req.filters)
        condition, exact = prefilter(flt, _FILTER_COLUMNS, _has_label(ctx.namespace))
        in_namespace = containers.c.namespace == ctx.namespace
        if condition is not None:
            in_namespace = in_namespace & condition
        with self.db.read() as conn:
            if not exact:
                # What SQL could not decide (a regexp, say) is matched on the filterable
                # columns alone; only the matches' whole records are read and decoded.
                light = conn.execute(select(*_FILTER_VIEW_COLUMNS).where(in_namespace)).all()
                ids = [row[0] for row in light if flt.match(container_lookup(_filter_view(row)))]
                rows: list[Any] = []
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    rows += conn.execute(select(*_COLUMNS).where(in_namespace, containers.c.id.in_(chunk))).all()
                rows.sort(key=lambda row: row[0])
            else:
                rows = conn.execute(select(*_COLUMNS).where(in_namespace).order_by(containers.c.id)).all()
        return {"containers": [_container_dict(row) for row in rows]}

    @handles("containers.create")
    def create_container(self, req: CreateContainer, ctx: CallContext) -> dict:
        container = req.container.model_dump()
        container["labels"] = without_empty(container["labels"])
        _validate(container)
        at = now()
        container["created_at"] = container["updated_at"] = at
        with self.db.write() as conn:
            if self._fetch_container(ctx.namespace, container["id"]) is not None:
                raise AlreadyExists(f'container "{container["id"]}": already exists')
            ensure_namespace(conn, ctx.namespace, at)
            conn.execute(containers.insert().values(namespace=ctx.namespace, **_columns(container)))
            _write_labels(conn, ctx.namespace, container["id"], container["labels"])
        self.publish(
            "/containers/create",
            ctx.namespace,
            {"id": container["id"], "image": container["image"], "runtime": container["runtime"]},
        )
        return {"container": container}

    @handles("containers.update")
    def update_container(self, req: UpdateContainer, ctx: CallContext) -> dict:
        incoming = req.container.model_dump()
        cid = incoming["id"]
        at = now()
        with self.db.write() as conn:
            current = self._fetch_container(ctx.namespace, cid)
            if current is None:
                raise NotFound(f'container "{cid}": not found')
            mask = list(req.update_mask)
            if not mask:
                if current["snapshotter"] != incoming["snapshotter"]:
                    raise InvalidArgument("container.Snapshotter field is immutable")
                if current["runtime"]["name"] != incoming["runtime"]["name"]:
                    raise InvalidArgument("container.Runtime.Name field is immutable")
                mask = list(_DEFAULT_MASK)
            updated = _apply_mask(current, incoming, mask)
            updated["labels"] = without_empty(updated["labels"])
            _validate(updated)
            updated["updated_at"] = at
            conn.execute(
                containers.update()
                .where(containers.c.namespace == ctx.namespace, containers.c.id == cid)
                .values(**_columns(updated))
            )
            _write_labels(conn, ctx.namespace, cid, updated["labels"])
        self.publish(
            "/containers/update",
            ctx.namespace,
            {
                "id": cid,
                "image": updated["image"],
                "labels": updated["labels"],
                "snapshot_key": updated["snapshot_key"],
            },
        )
        return {"container": updated}

    @handles("containers.delete")
    def delete_container(self, req: DeleteContainer, ctx: CallContext) -> Empty:
        with self.db.write() as conn:
            gone = conn.execute(
                containers.delete().where(containers.c.namespace == ctx.namespace, containers.c.id == req.id)
            ).rowcount
            _write_labels(conn, ctx.namespace, req.id, {})
        if not gone:
            raise NotFound(f'container "{req.id}" in namespace "{ctx.namespace}": not found')
        self.publish("/containers/delete", ctx.namespace, {"id": req.id})
        return Empty()


def _apply_mask(current: dict[str, Any], incoming: dict[str, Any], mask: list[str]) -> dict[str, Any]:
    updated = {**current, "labels": dict(current["labels"]), "extensions": dict(current["extensions"])}
    for path in mask:
        key = mask_key(path, "labels")
        if key is not None:
            set_map_key(updated["labels"], incoming["labels"], key)
            continue
        key = mask_key(path, "extensions")
        if key is not None:
            if key in incoming["extensions"]:
                updated["extensions"][key] = incoming["extensions"][key]
            else:
                updated["extensions"].pop(key, None)
            continue
        if path == "labels":
            updated["labels"] = dict(incoming["labels"])
        elif path == "spec":
            updated["spec"] = incoming["spec"]
        elif path == "extensions":
            updated["extensions"] = dict(incoming["extensions"])
        elif path == "image":
            updated["image"] = incoming["image"]
        elif path in ("snapshotkey", "snapshot_key"):
            updated["snapshot_key"] = incoming["snapshot_key"]
        else:
            raise InvalidArgument(f'cannot update "{path}" field on "{current["id"]}"')
    return updated
