"""images.*: image records (name -> target descriptor) per namespace."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select

from moord.actors.base import DEFERRED, CallContext, handles
from moord.actors.gc import CollectAndAnswer
from moord.actors.metadata.common import StoreBase, ensure_namespace, mask_key, now, set_map_key, without_empty
from moord.actors.metadata.schema import images, pack_map, unpack_map
from moord.messages import filters
from moord.messages.base import Empty
from moord.messages.errors import AlreadyExists, InvalidArgument, NotFound
from moord.messages.images import CreateImage, DeleteImage, GetImage, ListImages, UpdateImage

_COLUMNS = (
    images.c.name,
    images.c.media_type,
    images.c.digest,
    images.c.size,
    images.c.annotations,
    images.c.labels,
    images.c.created_at,
    images.c.updated_at,
)


def _image_dict(row: Row[Any]) -> dict[str, Any]:
    return {
        "name": row.name,
        "labels": unpack_map(row.labels),
        "target": {
            "media_type": row.media_type,
            "digest": row.digest,
            "size": row.size,
            "annotations": unpack_map(row.annotations),
        },
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def image_lookup(image: dict[str, Any]) -> filters.Lookup:
    """Filter fields of an image: name, target.digest, target.mediatype, labels, annotations."""

    def lookup(path: list[str]) -> tuple[str, bool]:
        head = path[0]
        if head == "name":
            return image["name"], bool(image["name"])
        if head == "target":
            if len(path) < 2:
                return "", False
            target = image["target"]
            if path[1] == "digest":
                return target["digest"], bool(target["digest"])
            if path[1] == "mediatype":
                return target["media_type"], bool(target["media_type"])
            return "", False
        if head == "labels":
            return filters.map_lookup(image["labels"], path[1:])
        if head == "annotations":
            return filters.map_lookup(image["target"]["annotations"], path[1:])
        return "", False

    return lookup


def _validate(image: dict[str, Any]) -> None:
    target = image["target"]
    if target["size"] <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if not target["media_type"]:
        raise InvalidArgument("Target.MediaType must be set")


class ImagesService(StoreBase):
    """Image records: create, get, list (filters), update (masks), delete."""

    def _fetch_image(self, conn: Any, namespace: str, name: str) -> dict[str, Any] | None:
        row = conn.execute(
            select(*_COLUMNS).where(images.c.namespace == namespace, images.c.name == name)
        ).first()
        return _image_dict(row) if row else None

    @handles("images.get")
    def get_image(self, req: GetImage, ctx: CallContext) -> dict:
        with self.db.read() as conn:
            image = self._fetch_image(conn, ctx.namespace, req.name)
        if image is None:
            raise NotFound(f'image "{req.name}": not found')
        return {"image": image}

    @handles("images.list")
    def list_images(self, req: ListImages, ctx: CallContext) -> dict:
        flt = filters.parse(req.filters)
        with self.db.read() as conn:
            rows = conn.execute(
                select(*_COLUMNS).where(images.c.namespace == ctx.namespace).order_by(images.c.name)
            ).all()
        found = [_image_dict(row) for row in rows]
        if not flt.always:
            found = [image for image in found if flt.match(image_lookup(image))]
        return {"images": found}

    @handles("images.create")
    def create_image(self, req: CreateImage, ctx: CallContext) -> dict:
        image = req.image.model_dump()
        image["labels"] = without_empty(image["labels"])
        _validate(image)
        at = now()
        image["created_at"] = image["updated_at"] = at
        with self.db.write() as conn:
            if self._fetch_image(conn, ctx.namespace, image["name"]) is not None:
                raise AlreadyExists(f'image "{image["name"]}": already exists')
            ensure_namespace(conn, ctx.namespace, at)
            conn.execute(images.insert().values(namespace=ctx.namespace, **_columns(image)))
        self.publish("/images/create", ctx.namespace, {"name": image["name"], "labels": image["labels"]})
        return {"image": image}

    @handles("images.update")
    def update_image(self, req: UpdateImage, ctx: CallContext) -> dict:
        incoming = req.image.model_dump()
        name = incoming["name"]
        at = now()
        with self.db.write() as conn:
            current = self._fetch_image(conn, ctx.namespace, name)
            if current is None:
                raise NotFound(f'image "{name}": not found')
            updated = _apply_mask(current, incoming, req.update_mask)
            updated["labels"] = without_empty(updated["labels"])
            _validate(updated)
            updated["created_at"] = current["created_at"]
            updated["updated_at"] = at
            conn.execute(
                images.update()
                .where(images.c.namespace == ctx.namespace, images.c.name == name)
                .values(**_columns(updated))
            )
        self.publish("/images/update", ctx.namespace, {"name": name, "labels": updated["labels"]})
        return {"image": updated}

    @handles("images.delete")
    def delete_image(self, req: DeleteImage, ctx: CallContext) -> Any:
        """Delete an image record; with `sync`, answer once a collection has run (ctr rm --sync)."""
        with self.db.write() as conn:
            gone = conn.execute(
                images.delete().where(images.c.namespace == ctx.namespace, images.c.name == req.name)
            ).rowcount
        if not gone:
            raise NotFound(f'image "{req.name}": not found')
        self.publish("/images/delete", ctx.namespace, {"name": req.name})
        gc = getattr(self, "gc", None)
        if req.sync and gc is not None:
            # The GC actor answers once it has collected; this actor stays free meanwhile.
            gc.tell(CollectAndAnswer(ctx))
            return DEFERRED
        return Empty()


def _apply_mask(current: dict[str, Any], incoming: dict[str, Any], mask: list[str]) -> dict[str, Any]:
    """containerd's image update: no mask replaces labels and target; else field by field."""
    if not mask:
        return {**incoming}
    updated = {**current, "labels": dict(current["labels"]), "target": {**current["target"]}}
    updated["target"]["annotations"] = dict(current["target"]["annotations"])
    for path in mask:
        key = mask_key(path, "labels")
        if key is not None:
            set_map_key(updated["labels"], incoming["labels"], key)
            continue
        key = mask_key(path, "annotations")
        if key is not None:
            set_map_key(updated["target"]["annotations"], incoming["target"]["annotations"], key)
            continue
        if path == "labels":
            updated["labels"] = dict(incoming["labels"])
        elif path == "target":
            updated["target"] = {**incoming["target"]}
        elif path == "annotations":
            updated["target"]["annotations"] = dict(incoming["target"]["annotations"])
        else:
            raise InvalidArgument(f'cannot update "{path}" field on image "{current["name"]}"')
    return updated


def _columns(image: dict[str, Any]) -> dict[str, Any]:
    target = image["target"]
    return {
        "name": image["name"],
        "media_type": target["media_type"],
        "digest": target["digest"],
        "size": target["size"],
        "annotations": pack_map(target["annotations"]),
        "labels": pack_map(image["labels"]),
        "created_at": image["created_at"],
        "updated_at": image["updated_at"],
    }

