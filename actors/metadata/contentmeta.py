"""contentmeta.*: which namespace owns which blob (asked by the content process)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, exists, select

from moord.actors.base import CallContext, handles
from moord.actors.metadata.common import StoreBase, ensure_namespace, mask_key, now, set_map_key, without_empty
from moord.actors.metadata.schema import content, pack_map, unpack_map
from moord.messages import filters
from moord.messages.content import (
    AddOwnership,
    OwnershipCheck,
    OwnershipDelete,
    OwnershipInfo,
    OwnershipList,
    OwnershipUpdate,
)
from moord.messages.errors import InvalidArgument, NotFound

_COLUMNS = (content.c.digest, content.c.size, content.c.labels, content.c.created_at, content.c.updated_at)


def _info_dict(row: Row[Any]) -> dict[str, Any]:
    return {
        "digest": row.digest,
        "size": row.size,
        "labels": unpack_map(row.labels),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def content_lookup(info: dict[str, Any]) -> filters.Lookup:
    """Filter fields of a blob: digest, size, labels."""

    def lookup(path: list[str]) -> tuple[str, bool]:
        head = path[0]
        if head == "digest":
            return info["digest"], True
        if head == "size":
            return str(info["size"]), True
        if head == "labels":
            return filters.map_lookup(info["labels"], path[1:])
        return "", False

    return lookup


def _not_found(digest: str) -> NotFound:
    return NotFound(f"content digest {digest}: not found")


class ContentOwnershipService(StoreBase):
    """Per-namespace records of committed blobs: the content process's view filter."""

    def _fetch_info(self, conn: Any, namespace: str, digest: str) -> dict[str, Any] | None:
        row = conn.execute(
            select(*_COLUMNS).where(content.c.namespace == namespace, content.c.digest == digest)
        ).first()
        return _info_dict(row) if row else None

    @handles("contentmeta.add")
    def add_ownership(self, req: AddOwnership, ctx: CallContext) -> dict:
        at = now()
        labels = without_empty(req.labels)
        with self.db.write() as conn:
            current = self._fetch_info(conn, ctx.namespace, req.digest)
            if current is None:
                ensure_namespace(conn, ctx.namespace, at)
                info = {"digest": req.digest, "size": req.size, "labels": labels, "created_at": at, "updated_at": at}
                conn.execute(
                    content.insert().values(
                        namespace=ctx.namespace,
                        digest=req.digest,
                        size=req.size,
                        labels=pack_map(labels),
                        created_at=at,
                        updated_at=at,
                    )
                )
                return {"info": info, "created": True}
            if current["size"] != req.size:
                raise InvalidArgument(
                    f"content digest {req.digest}: size {req.size} differs from the recorded {current['size']}"
                )
            current["labels"] = without_empty({**current["labels"], **req.labels})
            current["updated_at"] = at
            conn.execute(
                content.update()
                .where(content.c.namespace == ctx.namespace, content.c.digest == req.digest)
                .values(labels=pack_map(current["labels"]), updated_at=at)
            )
        return {"info": current, "created": False}

    @handles("contentmeta.info")
    def ownership_info(self, req: OwnershipInfo, ctx: CallContext) -> dict:
        with self.db.read() as conn:
            info = self._fetch_info(conn, ctx.namespace, req.digest)
        if info is None:
            raise _not_found(req.digest)
        return {"info": info}

    @handles("contentmeta.update")
    def update_ownership(self, req: OwnershipUpdate, ctx: CallContext) -> dict:
        digest = req.info.digest
        incoming = req.info.labels
        at = now()
        with self.db.write() as conn:
            info = self._fetch_info(conn, ctx.namespace, digest)
            if info is None:
                raise _not_found(digest)
            labels = info["labels"]
            if req.update_mask:
                for path in req.update_mask:
                    key = mask_key(path, "labels")
                    if key is not None:
                        set_map_key(labels, incoming, key)
                    elif path == "labels":
                        labels = without_empty(incoming)
                    else:
                        raise InvalidArgument(f'cannot update "{path}" field on content info "{digest}"')
            else:
                labels = without_empty(incoming)
            info["labels"] = labels
            info["updated_at"] = at
            conn.execute(
                content.update()
                .where(content.c.namespace == ctx.namespace, content.c.digest == digest)
                .values(labels=pack_map(labels), updated_at=at)
            )
        return {"info": info}

    @handles("contentmeta.list")
    def list_ownership(self, req: OwnershipList, ctx: CallContext) -> dict:
        flt = filters.parse(req.filters)
        with self.db.read() as conn:
            rows = conn.execute(
                select(*_COLUMNS).where(content.c.namespace == ctx.namespace).order_by(content.c.digest)
            ).all()
        infos = [_info_dict(row) for row in rows]
        if not flt.always:
            infos = [info for info in infos if flt.match(content_lookup(info))]
        return {"infos": infos}

    @handles("contentmeta.delete")
    def delete_ownership(self, req: OwnershipDelete, ctx: CallContext) -> dict:
        with self.db.write() as conn:
            gone = conn.execute(
                content.delete().where(content.c.namespace == ctx.namespace, content.c.digest == req.digest)
            ).rowcount
            if not gone:
                raise _not_found(req.digest)
            still_owned = conn.execute(select(exists().where(content.c.digest == req.digest))).scalar()
        return {"still_owned": bool(still_owned)}

    @handles("contentmeta.check")
    def check_ownership(self, req: OwnershipCheck, ctx: CallContext) -> dict:
        with self.db.read() as conn:
            size = conn.execute(
                select(content.c.size).where(content.c.namespace == ctx.namespace, content.c.digest == req.digest)
            ).scalar()
            if size is not None:
                return {"owned": True, "size": size, "owned_anywhere": True}
            anywhere = conn.execute(select(exists().where(content.c.digest == req.digest))).scalar()
        return {"owned": False, "size": 0, "owned_anywhere": bool(anywhere)}
