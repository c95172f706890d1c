"""What the garbage collector needs of the content process: `contentgc.walk` and `.remove`.

Composed into ContentActor, so it runs on the actor's one thread: a commit (blob renamed
into place, then its owner recorded in metadata) is never half-done while a walk or a
removal runs. Before a blob is unlinked the metadata process is asked again whether any
namespace owns it; an ingest goes only if nobody wrote to it since the walk.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from moord.actors.base import CallContext, handles
from moord.bus.client import Client
from moord.linux.files import fsync_dir, read_small
from moord.messages.content import INGEST_LOCK_STALE_SECONDS
from moord.messages.gc import ContentRemoval, ContentWalk, RemoveContent, WalkContent

log = logging.getLogger(__name__)

_HEX_RE = re.compile(r"^[a-f0-9]{64}$")


def _small(path: str) -> str:
    text = read_small(path)
    return "" if text is None else text


class ContentGcSupport:
    """contentgc.walk and contentgc.remove over ContentActor's directories."""

    client: Client
    blobs_dir: str
    ingest_dir: str
    _ingests: dict[tuple[str, str], Any]
    _locks: dict[tuple[str, str], Any]

    @handles("contentgc.walk")
    def gc_walk(self, req: WalkContent, ctx: CallContext) -> ContentWalk:
        """Blob digests on disk and every ingest (namespace, ref, expected, last write)."""
        blobs = sorted("sha256:" + name for name in os.listdir(self.blobs_dir) if _HEX_RE.match(name))
        ingests = []
        for name in sorted(os.listdir(self.ingest_dir)):
            path = os.path.join(self.ingest_dir, name)
            namespace, ref = _small(os.path.join(path, "namespace")), _small(os.path.join(path, "ref"))
            if not namespace or not ref:
                continue
            cached = self._ingests.get((namespace, ref))
            if cached is not None:
                updated, expected = cached.updated_at, cached.expected
            else:
                from moord.actors.content import ingest_updated_at

                started = _small(os.path.join(path, "startedat"))
                updated = ingest_updated_at(path, float(started or 0))
                expected = _small(os.path.join(path, "expected"))
            ingests.append({"namespace": namespace, "ref": ref, "expected": expected, "updated_at": updated})
        return ContentWalk(blobs=blobs, ingests=ingests)  # type: ignore[arg-type]

    @handles("contentgc.remove")
    def gc_remove(self, req: RemoveContent, ctx: CallContext) -> ContentRemoval:
        """Unlink blobs no namespace owns (asked again now); drop ingests idle since the walk."""
        removed: list[str] = []
        freed = 0
        if req.blobs:
            held = set(self.client.call("gc.content_held", {"digests": list(req.blobs)}).get("held", []))
            for digest in req.blobs:
                if digest in held:
                    continue
                path = os.path.join(self.blobs_dir, digest.split(":", 1)[1])
                try:
                    size = os.stat(path).st_size
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(digest)
                freed += size
            if removed:
                fsync_dir(self.blobs_dir)
        gone_ingests = []
        now = time.time()
        current_ingests = (
            {(i.namespace, i.ref): i.updated_at for i in self.gc_walk(WalkContent(), ctx).ingests} if req.ingests else {}
        )
        for ingest in req.ingests:
            key = (ingest.namespace, ingest.ref)
            lock = self._locks.get(key)
            if lock is not None and now - lock.last_seen < INGEST_LOCK_STALE_SECONDS:
                continue  # a writer is at it
            if current_ingests.get(key) != ingest.updated_at:
                continue  # written to since the walk, or gone
            if self._remove_ingest(*key):  # type: ignore[attr-defined]
                gone_ingests.append({"namespace": ingest.namespace, "ref": ingest.ref})
        if removed or gone_ingests:
            log.info("gc: removed %d blobs (%d bytes) and %d ingests", len(removed), freed, len(gone_ingests))
        return ContentRemoval(blobs=removed, ingests=gone_ingests, bytes_freed=freed)  # type: ignore[arg-type]
