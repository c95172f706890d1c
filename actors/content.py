"""The content process: blobs by digest and resumable ingests, seen per namespace.

Layout (containerd's local store):

    <root>/io.containerd.content.v1.content/blobs/sha256/<hex>      committed, read-only
    <root>/io.containerd.content.v1.content/ingest/<sha256(ns, ref)>/
        data ref namespace total expected startedat   (updated: the data file's mtime)

Blobs are shared on disk; which namespace sees which blob is recorded by the metadata
process (`contentmeta.*`), and every info/read/update/list/delete goes through it. An
ingest's directory name is a hash of its namespace and ref, so no ref can name a path;
digests are validated before they become a file name. One actor serves everything, so
the writer locks below need no lock of their own.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moord.actors.base import DEFERRED, CallContext, ServiceActor, handles
from moord.actors.content_gc import ContentGcSupport
from moord.bus.client import Client
from moord.bus.events import EventPublisher
from moord.linux.files import fsync_dir, read_small, write_atomic
from moord.messages import filters
from moord.messages.base import Empty
from moord.messages.content import (
    INGEST_LOCK_STALE_SECONDS,
    MAX_CHUNK_BYTES,
    ContentAbort,
    ContentDelete,
    ContentInfoRequest,
    ContentList,
    ContentListStatuses,
    ContentRead,
    ContentStatus,
    ContentUpdate,
    ContentWrite,
    IngestStatus,
    ReadReply,
    StatusList,
    StatusReply,
    WriteReply,
)
from moord.messages.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MoordError,
    NotFound,
    OutOfRange,
    Unavailable,
)

if TYPE_CHECKING:
    from moord.supervisor.process import ProcessContext

log = logging.getLogger(__name__)

CONTENT_DIR = "io.containerd.content.v1.content"
_DIGEST_RE = re.compile(r"sha256:([a-f0-9]{64})")
_READ_BUFFER = 1024 * 1024
_LOCK_SWEEP_THRESHOLD = 256


def blob_relpath(digest: str) -> str:
    """`blobs/sha256/<hex>` for a valid digest; anything else is InvalidArgument."""
    match = _DIGEST_RE.fullmatch(digest)
    if not match:
        raise InvalidArgument(f"invalid digest {digest[:100]!r}: want sha256:<64 lowercase hex>")
    return os.path.join("blobs", "sha256", match.group(1))


def ingest_updated_at(path: str, started_at: float) -> float:
    """When an ingest was last written: its data file's mtime (or its start)."""
    try:
        return os.stat(os.path.join(path, "data")).st_mtime
    except FileNotFoundError:
        return started_at


def _read_small(path: str, default: str = "") -> str:
    text = read_small(path)
    return default if text is None else text


@dataclass
class Ingest:
    """An unfinished write, mirrored on disk; the hash covers data[:offset]."""

    namespace: str
    ref: str
    path: str
    offset: int = 0
    total: int = 0
    expected: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    hasher: Any = field(default_factory=hashlib.sha256)

    @property
    def data_path(self) -> str:
        """The file holding the bytes written so far."""
        return os.path.join(self.path, "data")

    @property
    def digest(self) -> str:
        """The digest of the bytes written so far."""
        return "sha256:" + self.hasher.hexdigest()

    def status(self) -> IngestStatus:
        """The ingest as content.status shows it."""
        return IngestStatus(
            ref=self.ref,
            offset=self.offset,
            total=self.total,
            expected=self.expected,
            started_at=self.started_at,
            updated_at=self.updated_at,
        )

    def set_field(self, name: str, value: str) -> None:
        """Persist one small field (total, expected) next to the data."""
        # Rewritten per chunk: atomic, but not fsynced (the data file's fsync at commit is what counts).
        write_atomic(os.path.join(self.path, name), value, durable=False)


@dataclass
class WriterLock:
    """Which write session holds a ref, since when, and when it was last heard from."""

    writer: str
    since: float
    last_seen: float


class ContentActor(ContentGcSupport, ServiceActor):
    """Serves content.*: writes (stat/write/commit/close), reads, info, list, delete."""

    def __init__(self, root: str, client: Client, events: EventPublisher | None = None) -> None:
        super().__init__()
        self.root = root
        self.client = client
        self.events = events
        self.blobs_dir = os.path.join(root, "blobs", "sha256")
        self.ingest_dir = os.path.join(root, "ingest")
        for path in (self.blobs_dir, self.ingest_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._ingests: dict[tuple[str, str], Ingest] = {}
        self._locks: dict[tuple[str, str], WriterLock] = {}

    # -- ownership (metadata process) --------------------------------------------

    def _meta(self, kind: str, payload: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return self.client.call(kind, payload, namespace=ctx.namespace, lease=ctx.lease)

    @handles("content.info")
    def info(self, req: ContentInfoRequest, ctx: CallContext) -> dict:
        return self._meta("contentmeta.info", {"digest": req.digest}, ctx)

    @handles("content.update")
    def update(self, req: ContentUpdate, ctx: CallContext) -> dict:
        return self._meta("contentmeta.update", req.model_dump(), ctx)

    @handles("content.list")
    def list(self, req: ContentList, ctx: CallContext) -> dict:
        return self._meta("contentmeta.list", {"filters": req.filters}, ctx)

    @handles("content.delete")
    def delete(self, req: ContentDelete, ctx: CallContext) -> Empty:
        relpath = blob_relpath(req.digest)
        reply = self._meta("contentmeta.delete", {"digest": req.digest}, ctx)
        if not reply.get("still_owned", True):
            # No namespace sees the blob any more (leases and GC will refine this).
            try:
                os.unlink(os.path.join(self.root, relpath))
            except FileNotFoundError:
                pass
        if self.events is not None:
            try:
                self.events.publish("/content/delete", ctx.namespace, {"digest": req.digest})
            except Exception:
                log.exception("publishing /content/delete failed")
        return Empty()

    @handles("content.read")
    def read(self, req: ContentRead, ctx: CallContext) -> Any:
        relpath = blob_relpath(req.digest)
        owned = self._meta("contentmeta.check", {"digest": req.digest}, ctx)
        if not owned.get("owned"):
            raise NotFound(f"content digest {req.digest}: not found")
        try:
            fd = os.open(os.path.join(self.root, relpath), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"content digest {req.digest}: blob missing from the store") from None
        try:
            size = os.fstat(fd).st_size
            if req.offset > size:
                raise OutOfRange(f"read offset {req.offset} beyond the blob's size {size}")
            want = min(req.size or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, size - req.offset)
            data = os.pread(fd, want, req.offset)
        finally:
            os.close(fd)
        ctx.reply(ReadReply(offset=req.offset, size=size), frames=[data])
        return DEFERRED  # answered above, with the bytes as a frame

    # -- ingests ----------------------------------------------------------------

    def _ingest_path(self, namespace: str, ref: str) -> str:
        # Hashing makes any ref (slashes, "..", NULs) a fixed-width hex name.
        name = hashlib.sha256(f"{namespace}\0{ref}".encode("utf-8", "surrogatepass")).hexdigest()
        return os.path.join(self.ingest_dir, name)

    def _load_ingest(self, namespace: str, ref: str) -> Ingest | None:
        """The ingest of (namespace, ref): cached, else resumed from disk (rehashing its data)."""
        key = (namespace, ref)
        cached = self._ingests.get(key)
        if cached is not None:
            return cached
        path = self._ingest_path(namespace, ref)
        if not os.path.isdir(path):
            return None
        if _read_small(os.path.join(path, "ref")) != ref or _read_small(os.path.join(path, "namespace")) != namespace:
            log.warning("ingest %s does not belong to %s/%s: replacing it", path, namespace, ref)
            shutil.rmtree(path, ignore_errors=True)
            return None
        ingest = Ingest(namespace, ref, path)
        ingest.total = int(_read_small(os.path.join(path, "total"), "0") or 0)
        ingest.expected = _read_small(os.path.join(path, "expected"))
        ingest.started_at = float(_read_small(os.path.join(path, "startedat"), "0") or 0)
        ingest.updated_at = ingest_updated_at(path, ingest.started_at)
        try:
            with open(ingest.data_path, "rb") as fh:
                while chunk := fh.read(_READ_BUFFER):
                    ingest.hasher.update(chunk)
                    ingest.offset += len(chunk)
        except FileNotFoundError:
            open(ingest.data_path, "wb").close()
        self._ingests[key] = ingest
        return ingest

    def _create_ingest(self, namespace: str, ref: str, total: int, expected: str) -> Ingest:
        path = self._ingest_path(namespace, ref)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, mode=0o700)
        at = time.time()
        ingest = Ingest(namespace, ref, path, total=total, expected=expected, started_at=at, updated_at=at)
        write_atomic(os.path.join(path, "ref"), ref)
        write_atomic(os.path.join(path, "namespace"), namespace)
        write_atomic(os.path.join(path, "startedat"), repr(at))
        if total:
            ingest.set_field("total", str(total))
        if expected:
            ingest.set_field("expected", expected)
        open(ingest.data_path, "wb").close()
        self._ingests[(namespace, ref)] = ingest
        return ingest

    def _remove_ingest(self, namespace: str, ref: str) -> bool:
        self._ingests.pop((namespace, ref), None)
        self._locks.pop((namespace, ref), None)
        path = self._ingest_path(namespace, ref)
        if not os.path.isdir(path):
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True

    @handles("content.status")
    def status(self, req: ContentStatus, ctx: CallContext) -> StatusReply:
        ingest = self._load_ingest(ctx.namespace, req.ref)
        if ingest is None:
            raise NotFound(f"reference {req.ref}: not found")
        return StatusReply(status=ingest.status())

    @handles("content.list_statuses")
    def list_statuses(self, req: ContentListStatuses, ctx: CallContext) -> StatusList:
        flt = filters.parse(req.filters)
        statuses = []
        for name in sorted(os.listdir(self.ingest_dir)):
            path = os.path.join(self.ingest_dir, name)
            if _read_small(os.path.join(path, "namespace")) != ctx.namespace:
                continue
            ref = _read_small(os.path.join(path, "ref"))
            if not ref or not flt.match(lambda fp, ref=ref: (ref, True) if fp[0] == "ref" else ("", False)):
                continue
            ingest = self._load_ingest(ctx.namespace, ref)
            if ingest is not None:
                statuses.append(ingest.status())
        return StatusList(statuses=statuses)

    @handles("content.abort")
    def abort(self, req: ContentAbort, ctx: CallContext) -> Empty:
        if not self._remove_ingest(ctx.namespace, req.ref):
            raise NotFound(f"ingest ref {req.ref!r}: not found")
        return Empty()

    # -- writes -----------------------------------------------------------------

    def _take_lock(self, key: tuple[str, str], writer: str) -> None:
        """Let `writer` act on the ref, or raise Unavailable while another session holds it."""
        at = time.time()
        if len(self._locks) > _LOCK_SWEEP_THRESHOLD:
            # sessions that vanished without close leave entries: drop the stale ones
            self._locks = {
                k: v for k, v in self._locks.items() if at - v.last_seen < INGEST_LOCK_STALE_SECONDS
            }
        held = self._locks.get(key)
        if held is not None and held.writer != writer and at - held.last_seen < INGEST_LOCK_STALE_SECONDS:
            raise Unavailable(
                f"ref {key[1]} locked for {at - held.since:.3f}s (since {time.ctime(held.since)})"
            )
        if not writer:
            return  # an anonymous one-request session never holds the lock
        if held is None or held.writer != writer:
            self._locks[key] = WriterLock(writer, at, at)
        else:
            held.last_seen = at

    def _release_lock(self, key: tuple[str, str], writer: str) -> None:
        held = self._locks.get(key)
        if held is not None and held.writer == writer:
            del self._locks[key]

    @handles("content.write")
    def write(self, req: ContentWrite, ctx: CallContext) -> WriteReply:
        key = (ctx.namespace, req.ref)
        self._take_lock(key, req.writer)
        if req.action == "close":
            self._release_lock(key, req.writer)
            ingest = self._load_ingest(*key)
            return WriteReply(action="close", offset=ingest.offset if ingest else 0)
        try:
            return self._write_step(req, ctx)
        except MoordError:
            # containerd ends the Write stream on any error, and with it the session.
            self._release_lock(key, req.writer)
            raise

    def _write_step(self, req: ContentWrite, ctx: CallContext) -> WriteReply:
        namespace, ref = ctx.namespace, req.ref
        if req.expected:
            self._refuse_existing(req, ctx)
        ingest = self._load_ingest(namespace, ref)
        if ingest is not None and req.total and ingest.total and req.total != ingest.total:
            log.info("ingest %s: total changed from %d to %d, starting over", ref, ingest.total, req.total)
            ingest = None
        if ingest is None:
            ingest = self._create_ingest(namespace, ref, req.total, req.expected)
        else:
            if req.total and req.total != ingest.total:
                ingest.total = req.total
                ingest.set_field("total", str(req.total))
            if req.expected and req.expected != ingest.expected:
                ingest.expected = req.expected
                ingest.set_field("expected", req.expected)

        if req.action == "stat":
            return self._reply(req.action, ingest)
        if req.offset > 0 and req.offset != ingest.offset:
            raise OutOfRange(f"write @{req.offset} must occur at current offset {ingest.offset}")
        if req.offset == 0 and ingest.offset > 0 and (ctx.frames or req.action == "write"):
            self._truncate(ingest)
        self._append(ingest, ctx.frames)
        if req.action == "commit":
            return self._commit(ingest, req, ctx)
        return self._reply(req.action, ingest)

    def _refuse_existing(self, req: ContentWrite, ctx: CallContext) -> None:
        """AlreadyExists if the expected blob is here: owned, or on disk (then owned now)."""
        check = self._meta("contentmeta.check", {"digest": req.expected, "hold": True}, ctx)
        if not check.get("owned"):
            blob = os.path.join(self.root, blob_relpath(req.expected))
            try:
                size = os.stat(blob).st_size
            except FileNotFoundError:
                return
            if req.total and req.total != size:
                return  # not the blob the writer describes: let its commit tell
            # Shared on disk, new to this namespace: no bytes need to move.
            self._meta("contentmeta.add", {"digest": req.expected, "size": size, "labels": req.labels}, ctx)
        self._remove_ingest(ctx.namespace, req.ref)
        raise AlreadyExists(f"blob with expected digest {req.expected} exists")

    def _truncate(self, ingest: Ingest) -> None:
        with open(ingest.data_path, "wb"):
            pass
        ingest.offset = 0
        ingest.hasher = hashlib.sha256()

    def _append(self, ingest: Ingest, frames: list[Any]) -> None:
        size = sum(len(memoryview(frame)) for frame in frames)
        if size > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"write of {size} bytes exceeds the chunk limit of {MAX_CHUNK_BYTES}")
        if not size:
            return
        fd = os.open(ingest.data_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            offset = ingest.offset
            for frame in frames:
                view = memoryview(frame)
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], offset + written)
                ingest.hasher.update(view)
                offset += len(view)
            os.ftruncate(fd, offset)  # drop any tail left by an earlier, longer attempt
        finally:
            os.close(fd)
        ingest.offset = offset
        # No file of its own: a restart reads it back from the data file's mtime.
        ingest.updated_at = time.time()

    def _commit(self, ingest: Ingest, req: ContentWrite, ctx: CallContext) -> WriteReply:
        total = req.total or ingest.total
        if total and ingest.offset != total:
            raise FailedPrecondition(f"unexpected commit size {ingest.offset}, expected {total}")
        digest = ingest.digest
        expected = req.expected or ingest.expected
        if expected and expected != digest:
            raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
        blob = os.path.join(self.root, blob_relpath(digest))
        fd = os.open(ingest.data_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not os.path.exists(blob):
            os.chmod(ingest.data_path, 0o444)
            try:
                os.rename(ingest.data_path, blob)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            fsync_dir(self.blobs_dir)
        size = ingest.offset
        self._remove_ingest(ctx.namespace, req.ref)
        added = self._meta("contentmeta.add", {"digest": digest, "size": size, "labels": req.labels}, ctx)
        if not added.get("created"):
            raise AlreadyExists(f"content {digest}: already exists")
        return WriteReply(action="commit", offset=size, total=size, digest=digest)

    def _reply(self, action: str, ingest: Ingest) -> WriteReply:
        return WriteReply(
            action=action,
            offset=ingest.offset,
            total=ingest.total,
            digest=ingest.digest,
            started_at=ingest.started_at,
            updated_at=ingest.updated_at,
        )


def content_root(root: str) -> str:
    """The content store's directory under the daemon's root."""
    return os.path.join(root, CONTENT_DIR)


def start(proc: ProcessContext) -> None:
    """Serve content.* from `<root>/io.containerd.content.v1.content`."""
    proc.serve(ContentActor, content_root(proc.config.root), proc.client, proc.events)
