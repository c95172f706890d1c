"""Pull and push in the images process: registries to content and snapshots, and back.

A pull resolves the reference, reads the index and manifests (each at most 4 MiB,
digest checked), then downloads every layer in parallel (at most
`max_concurrent_downloads` at a time) straight into content-store ingests named as
containerd names them (`layer-<digest>`), so a pull that dies resumes from the bytes
already written. The unpack is pipelined with the downloads: a layer is applied as
soon as its own bytes are committed, while later layers are still arriving.

On overlayfs the layers of an image are independent directories, so a layer whose
parent is not committed yet is extracted into a parentless staging snapshot, in
parallel with its parent; once the parent is committed, the real snapshot is
prepared on top of it and the staged directory is swapped in (renameat2
RENAME_EXCHANGE) before the commit. The one thing a staged extraction cannot see is
the parent's attributes of a directory the layer implies without listing it; such a
directory gets 0755 root:root, as a bottom layer's would.

Concurrent pulls in this process that share a layer download it once and unpack it
once (containerd issue 5675): both go through one in-flight table keyed by namespace
and digest, or by namespace, snapshotter and chain ID.

Labels are containerd's: `containerd.io/distribution.source.<host>` on every blob,
`containerd.io/gc.ref.content.*` on indexes and manifests, `containerd.io/uncompressed`
on unpacked layers and `containerd.io/gc.ref.snapshot.<snapshotter>` on configs.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from moord.actors import diff
from moord.actors.apply_workers import ApplyWorkers
from moord.actors.base import CallContext, PooledServiceActor, handles
from moord.actors.images import (
    GC_REF_SNAPSHOT,
    LABEL_SNAPSHOT_REF,
    blob_path,
    LABEL_UNCOMPRESSED,
    Session,
    _remove_quietly,
    apply_onto_mounts,
    child_labels,
    commit_timeout,
    open_layer,
    read_small_blob,
    save_image,
    write_blob,
)
from moord.bus.client import Client
from moord.config.model import Config
from moord.messages.content import MAX_CHUNK_BYTES
from moord.messages.distribution import (
    PROGRESS_INTERVAL,
    PROGRESS_TOPIC,
    PullImage,
    PullReply,
    PushImage,
    PushReply,
    TransferProgress,
)
from moord.messages.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MoordError,
    NotFound,
    Unavailable,
)
from moord.oci import image as oci
from moord.oci.layout import digest_hex, validate_descriptor

if TYPE_CHECKING:
    from moord.actors.registry.client import RegistryClient
    from moord.oci.reference import Reference

log = logging.getLogger(__name__)

# How often a blob download restarts from its ingest after a transient failure
# (registry connection, content process restarted) before the pull gives up.
FETCH_ATTEMPTS = 5
# Indexes may name indexes; deeper than this is refused.
MAX_INDEX_DEPTH = 4
# A hostile index must not make a pull fetch without end.
MAX_INDEX_ENTRIES = 1024
# Layers extracted side by side, each in its own worker process; streamed layers hold a
# worker while they download, so a few more than the cores.
UNPACK_WORKERS = 4
MAX_UNPACK_THREADS = 32
REGISTRY_WARMUP_DELAY = 3.0
# A 4 MiB chunk is written in milliseconds; a reply this late means the content process
# died with the request (ZeroMQ drops it silently): resume from the ingest instead.
CHUNK_WRITE_TIMEOUT = 10.0
F_SETPIPE_SZ = 1031
TEE_PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size's default

T = TypeVar("T")


class InFlight:
    """One in-flight run per key: a second caller waits for the first, then runs its own
    (cheap, idempotent) check again instead of repeating the work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[str, ...], threading.Event] = {}

    def run(self, key: tuple[str, ...], work: Callable[[], T]) -> T:
        """Run `work` unless another thread runs it for `key`; then wait and run it after."""
        while True:
            with self._lock:
                done = self._running.get(key)
                if done is None:
                    done = self._running[key] = threading.Event()
                    break
            done.wait()
        try:
            return work()
        finally:
            with self._lock:
                del self._running[key]
            done.set()


class Progress:
    """Publishes TransferProgress events, at most one per PROGRESS_INTERVAL per blob while bytes move."""

    def __init__(self, publish: Callable[[str, str, Any], None] | None, namespace: str, operation: str, ref: str) -> None:
        self._publish = publish
        self._namespace = namespace
        self._operation = operation
        self._ref = ref
        self._last: dict[str, float] = {}

    def __call__(self, desc: dict[str, Any], status: str, offset: int = 0, error: str = "") -> None:
        if self._publish is None or not self._operation:
            return
        if status in ("downloading", "pushing"):
            now = time.monotonic()
            if now - self._last.get(desc["digest"], 0.0) < PROGRESS_INTERVAL:
                return
            self._last[desc["digest"]] = now
        event = TransferProgress(
            operation=self._operation, ref=self._ref, digest=desc["digest"], media_type=desc.get("mediaType", ""),
            status=status, offset=offset, total=int(desc.get("size", 0)), error=error[:4096],  # type: ignore[arg-type]
        )
        try:
            self._publish(PROGRESS_TOPIC, self._namespace, event)
        except Exception as exc:  # progress must never fail a pull
            log.debug("progress event dropped: %s", exc)


class Tee:
    """A layer's bytes offered to its unpack while they download, through a FIFO.

    The unpack offers a FIFO (its worker reads it); the download takes the offer only
    when it starts from byte 0, and otherwise refuses. The unpack learns which before
    it starts reading, so neither side ever waits for a peer that is not coming."""

    OFFER_WAIT = 2.0  # how long a starting download waits for its unpack's offer

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fifo: str | None = None
        self._state = "open"  # open -> offered -> accepted | refused

    def offer(self, fifo: str) -> bool:
        """The unpack side: read the download through `fifo`, if it is still to come."""
        with self._cond:
            if self._state != "open":
                return False
            self._fifo, self._state = fifo, "offered"
            self._cond.notify_all()
            return True

    def accepted(self, fetched: "Future[None]") -> bool:
        """The unpack side: whether the download took the offer (False once it ended without)."""
        with self._cond:
            while self._state == "offered" and not fetched.done():
                self._cond.wait(0.2)
            if self._state == "offered":
                self._state = "refused"
            return self._state == "accepted"

    def take(self) -> str | None:
        """The download side, starting from byte 0: the FIFO to feed, or None."""
        with self._cond:
            deadline = time.monotonic() + self.OFFER_WAIT
            while self._state == "open" and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            if self._state == "offered":
                self._state = "accepted"
                self._cond.notify_all()
                return self._fifo
            self.refuse()
            return None

    def refuse(self) -> None:
        """Either side: no streaming for this layer."""
        with self._cond:
            if self._state in ("open", "offered"):
                self._state = "refused"
                self._cond.notify_all()


def _open_fifo_writer(path: str, timeout: float = 30.0) -> int | None:
    """The write end of a FIFO once its reader (an apply worker) has it open; None if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                return None
            time.sleep(0.005)
            continue
        os.set_blocking(fd, True)
        try:
            # A deep pipe keeps the apply busy while the download sends a chunk to the store.
            fcntl.fcntl(fd, F_SETPIPE_SZ, TEE_PIPE_BYTES)
        except OSError:
            pass  # a shallow pipe is slower, not wrong
        return fd


def _feed(fd: int | None, chunk: bytes) -> int | None:
    """Write a chunk into the FIFO; None (and the FIFO closed) once the reader has gone."""
    if fd is None:
        return None
    view = memoryview(chunk)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.close(fd)
        return None
    return fd


def _empty_directory(path: str) -> None:
    """Remove what a failed apply left in a snapshot directory, keeping the directory."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


# -- pull -----------------------------------------------------------------------------


def apply_target(mounts: list[dict[str, Any]]) -> tuple[str, str, list[str]] | None:
    """Where a layer can be applied without mounting: (directory, mode, parents), or None.

    An overlay's upperdir takes overlay whiteouts; a lone rw bind (a snapshot without
    parents) is its own directory, applied in native mode as if mounted."""
    layers = diff.layers_from_mounts(mounts)
    if layers is not None:
        return layers[0], diff.MODE_OVERLAY, layers[1]
    if len(mounts) == 1 and mounts[0].get("type") == "bind" and "rw" in (mounts[0].get("options") or []) and mounts[0].get("source"):
        return mounts[0]["source"], diff.MODE_NATIVE, []
    return None


@dataclass
class ManifestPlan:
    """One platform's manifest as the pull found it."""

    desc: dict[str, Any]
    data: bytes
    doc: dict[str, Any]
    platform: dict[str, str] | None
    config_desc: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PullPlan:
    """Everything a pull reads before the layers move: documents to write, manifests to unpack."""

    indexes: list[tuple[dict[str, Any], bytes, dict[str, Any]]] = field(default_factory=list)
    manifests: list[ManifestPlan] = field(default_factory=list)


def _kind_prefix(media_type: str) -> str:
    if media_type in oci.INDEX_TYPES:
        return "index"
    if media_type in oci.MANIFEST_TYPES:
        return "manifest"
    if "config" in media_type:
        return "config"
    return "layer"


def wanted_platforms(request: PullImage) -> list[dict[str, str]]:
    """The platforms a pull asks for (the host's when none)."""
    if not request.platforms:
        return [oci.host_platform()]
    try:
        return [oci.parse_platform(text) for text in request.platforms]
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _document_type(desc: dict[str, Any], doc: dict[str, Any]) -> str:
    media_type = str(desc.get("mediaType") or doc.get("mediaType") or "")
    if not media_type:  # old Docker documents may omit it: tell by the shape
        media_type = oci.MEDIA_TYPE_OCI_INDEX if "manifests" in doc else oci.MEDIA_TYPE_OCI_MANIFEST
    if media_type not in oci.INDEX_TYPES and media_type not in oci.MANIFEST_TYPES:
        raise InvalidArgument(f"{desc['digest']}: media type {media_type!r} is neither an index nor a manifest")
    return media_type


class Pull:
    """One transfer.pull: plan, fetch, unpack, record."""

    def __init__(
        self, session: Session, registry: "RegistryClient", root: str, request: PullImage,
        inflight: InFlight, progress: Progress, download_workers: int, workers: ApplyWorkers,
    ) -> None:
        from moord.oci.reference import parse_reference

        self.session = session
        self.registry = registry
        self.root = root
        self.request = request
        self.inflight = inflight
        self.progress = progress
        self.download_workers = download_workers
        self.workers = workers
        self.ref: Reference = parse_reference(request.ref)
        self.source_key, self.source_value = registry.source_label(self.ref)
        self.failed = threading.Event()
        self.tees: dict[str, Tee] = {}
        self.stats_lock = threading.Lock()
        self.blobs_fetched = 0
        self.bytes_fetched = 0
        self.layers_unpacked = 0

    @property
    def source(self) -> dict[str, str]:
        """The distribution.source label every pulled blob carries."""
        return {self.source_key: self.source_value}

    def merged_source(self, digest: str) -> dict[str, str]:
        """The source label for a blob that may exist already: this repository added to the
        ones it lists (comma separated, sorted), as containerd appends a source."""
        try:
            info = self.session.call("content.info", {"digest": digest})["info"]
        except NotFound:
            return self.source
        repos = {r for r in (info.get("labels") or {}).get(self.source_key, "").split(",") if r}
        repos.add(self.source_value)
        return {self.source_key: ",".join(sorted(repos))}

    # planning

    def fetch_document(self, desc: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """An index, manifest or config from the registry: (bytes, parsed)."""
        data = self.registry.fetch_document(self.ref, desc, limit=oci.MAX_MANIFEST_BYTES)
        try:
            return data, oci.load_document(data, f"{_kind_prefix(desc.get('mediaType', ''))} {desc['digest']}")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    def plan(self, root: dict[str, Any]) -> PullPlan:
        """Walk the index(es) down to the wanted manifests and their configs."""
        plan = PullPlan()
        wanted = wanted_platforms(self.request)
        self._walk(root, None, plan, wanted, path=())
        if not plan.manifests:
            names = ", ".join(f"{p['os']}/{p['architecture']}" for p in wanted)
            raise NotFound(f"{self.request.ref}: no manifest for platform {names}")
        for manifest in plan.manifests:
            manifest.config_desc = validate_descriptor(manifest.doc.get("config"), "manifest config")
            manifest.layers = [validate_descriptor(layer, "manifest layers") for layer in manifest.doc.get("layers", [])]
            self.progress(manifest.config_desc, "downloading")
            data, manifest.config = self.fetch_document(manifest.config_desc)
            digest = manifest.config_desc["digest"]
            write_blob(self.session, digest, len(data), lambda data=data: io.BytesIO(data), self.merged_source(digest))
            self._count(len(data))
            self.progress(manifest.config_desc, "downloaded", len(data))
        return plan

    def _walk(self, desc: dict[str, Any], platform: dict[str, str] | None, plan: PullPlan, wanted: list[dict[str, str]], path: tuple[str, ...]) -> None:
        if desc["digest"] in path:
            raise InvalidArgument(f"{self.request.ref}: index {desc['digest']} refers to itself")
        if len(path) > MAX_INDEX_DEPTH:
            raise InvalidArgument(f"{self.request.ref}: indexes nested deeper than {MAX_INDEX_DEPTH}")
        data, doc = self.fetch_document(desc)
        media_type = _document_type(desc, doc)
        desc = {**desc, "mediaType": media_type}
        if media_type in oci.MANIFEST_TYPES:
            if not any(m.desc["digest"] == desc["digest"] for m in plan.manifests):
                plan.manifests.append(ManifestPlan(desc=desc, data=data, doc=doc, platform=platform))
            return
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"index {desc['digest']}: manifests is not a list")
        plan.indexes.append((desc, data, doc))
        if len(entries) > MAX_INDEX_ENTRIES:
            raise InvalidArgument(f"index {desc['digest']}: {len(entries)} entries, more than {MAX_INDEX_ENTRIES}")
        children = [validate_descriptor(entry, f"index {desc['digest']}") for entry in entries]
        for entry, child in zip(entries, children):
            child_platform = entry.get("platform") if isinstance(entry.get("platform"), dict) else None
            if child.get("mediaType") in oci.INDEX_TYPES:
                self._walk(child, None, plan, wanted, path + (desc["digest"],))
            elif self.request.all_platforms or self._first_match(entries, wanted, child_platform) is entry:
                self._walk(child, child_platform, plan, wanted, path + (desc["digest"],))

    @staticmethod
    def _first_match(entries: list[Any], wanted: list[dict[str, str]], platform: dict[str, str] | None) -> Any:
        """The entry an index offers first for a wanted platform that `platform` matches
        (containerd keeps only the best match for each platform asked for)."""
        for w in wanted:
            if oci.platform_matches(platform, w):
                for entry in entries:
                    other = entry.get("platform") if isinstance(entry.get("platform"), dict) else None
                    if entry.get("mediaType") not in oci.INDEX_TYPES and oci.platform_matches(other, w):
                        return entry
        return None

    # fetching

    def _count(self, size: int) -> None:
        with self.stats_lock:
            self.blobs_fetched += 1
            self.bytes_fetched += size

    def fetch_blob(self, desc: dict[str, Any]) -> None:
        """Bring one layer into the content store, resuming its ingest; once per digest."""
        self.inflight.run(("blob", self.session.namespace, desc["digest"]), lambda: self._fetch_blob(desc))

    def _fetch_blob(self, desc: dict[str, Any]) -> None:
        digest, size = desc["digest"], int(desc["size"])
        tee = self.tees.get(digest) or Tee()
        ref = f"{_kind_prefix(desc.get('mediaType', ''))}-{digest}"
        # One writer name per blob: a pull that died (its process killed) left the lock
        # under this name, and the next pull of the blob takes it over at once.
        base = {"ref": ref, "total": size, "expected": digest, "writer": f"pull-{digest_hex(digest)}"}
        for attempt in range(FETCH_ATTEMPTS):
            if self.failed.is_set():
                return
            try:
                try:
                    status = self.session.call("content.write", {**base, "action": "stat"})
                except AlreadyExists:
                    tee.refuse()
                    self.session.update_labels(digest, size, self.merged_source(digest))
                    self.progress(desc, "exists", size)
                    return
                offset = int(status.get("offset", 0))
                if offset > size:
                    offset = 0  # not this blob's bytes: start over (offset 0 truncates)
                # Only a download from byte 0 can feed the unpack the whole layer.
                if offset == 0:
                    fifo = tee.take()
                else:
                    tee.refuse()
                    fifo = None
                sink = _open_fifo_writer(fifo) if fifo else None
                self.progress(desc, "downloading", offset)
                try:
                    with self.registry.open_blob(self.ref, desc, offset) as raw:
                        stream = io.BufferedReader(raw, MAX_CHUNK_BYTES)
                        while not self.failed.is_set():
                            chunk = stream.read(MAX_CHUNK_BYTES)
                            if not chunk:
                                break
                            self.session.call("content.write", {**base, "action": "write", "offset": offset}, frames=[chunk], timeout=CHUNK_WRITE_TIMEOUT)
                            sink = _feed(sink, chunk)
                            offset += len(chunk)
                            self.progress(desc, "downloading", offset)
                finally:
                    if sink is not None:
                        os.close(sink)  # end of stream for the unpack: complete or not, it checks
                if self.failed.is_set():
                    return
                if offset != size:
                    raise FailedPrecondition(f"blob {digest}: the registry sent {offset} bytes, the descriptor says {size}")
                try:
                    self.session.call("content.write", {**base, "action": "commit", "offset": offset, "labels": self.source}, timeout=commit_timeout(size))
                except AlreadyExists:
                    self.session.update_labels(digest, size, self.merged_source(digest))
                self._count(size)
                self.progress(desc, "downloaded", size)
                return
            except (Unavailable, DeadlineExceeded) as exc:
                if attempt + 1 == FETCH_ATTEMPTS:
                    raise
                log.info("blob %s: %s; resuming (attempt %d)", digest, exc, attempt + 2)
                time.sleep(min(0.25 * 2**attempt, 2.0))  # a restarting process needs ~1 s
            except FailedPrecondition:
                # A wrong digest or size: drop the ingest so no retry reuses bad bytes.
                try:
                    self.session.call("content.abort", {"ref": ref})
                except MoordError:
                    pass
                raise

    # unpacking

    def unpack_layers(self, manifest: ManifestPlan, fetched: dict[str, Future[None]], pool: ThreadPoolExecutor, snapshotter: str) -> list[Future[str]]:
        """Queue each layer's unpack; each waits for its own bytes, and commits after its parent."""
        diff_ids = manifest.config.get("rootfs", {}).get("diff_ids", [])
        layers = manifest.layers
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) or not layers:
            raise InvalidArgument(
                f"image {manifest.desc['digest']}: {len(layers)} layers but "
                f"{len(diff_ids) if isinstance(diff_ids, list) else 0} diff ids"
            )
        for d in diff_ids:
            digest_hex(d)
        chains = oci.chain_ids(diff_ids)
        jobs: list[Future[str]] = []
        parent_job: Future[str] | None = None
        for layer, diff_id, chain in zip(layers, diff_ids, chains):
            job = pool.submit(self._unpack_one, layer, diff_id, chain, parent_job, fetched[layer["digest"]], snapshotter)
            jobs.append(job)
            parent_job = job
        return jobs

    def _unpack_one(self, layer: dict[str, Any], diff_id: str, chain: str, parent_job: Future[str] | None, fetched: Future[None], snapshotter: str) -> str:
        if self.failed.is_set():
            raise FailedPrecondition("pull failed")
        key = ("chain", self.session.namespace, snapshotter, chain)
        try:
            self.inflight.run(key, lambda: self._unpack_chain(layer, diff_id, chain, parent_job, fetched, snapshotter))
        finally:
            self.tees.get(layer["digest"], Tee()).refuse()  # a download still waiting for an offer goes on alone
        fetched.result()
        self.session.update_labels(layer["digest"], layer["size"], {LABEL_UNCOMPRESSED: diff_id})
        return chain

    def _snapshot_exists(self, snapshotter: str, chain: str) -> bool:
        try:
            self.session.call("snapshots.stat", {"snapshotter": snapshotter, "key": chain})
            return True
        except NotFound:
            return False

    def _unpack_chain(self, layer: dict[str, Any], diff_id: str, chain: str, parent_job: Future[str] | None, fetched: Future[None], snapshotter: str) -> None:
        if self._snapshot_exists(snapshotter, chain):
            if parent_job is not None:
                parent_job.result()
            return
        self.progress(layer, "unpacking")
        staged: tuple[str, str] | None = None
        if parent_job is not None and not parent_job.done():
            staged = self._extract_staged(layer, diff_id, chain, snapshotter, fetched)
        parent = parent_job.result() if parent_job is not None else ""
        if self.failed.is_set():
            if staged:
                _remove_quietly(self.session, snapshotter, staged[0])
            raise FailedPrecondition("pull failed")
        key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain}"
        labels = {LABEL_SNAPSHOT_REF: chain}
        try:
            try:
                reply = self.session.call("snapshots.prepare", {"snapshotter": snapshotter, "key": key, "parent": parent, "labels": labels})
            except AlreadyExists:
                return  # another unpack committed it meanwhile
            try:
                if staged is None or not self._swap_in(staged[1], reply["mounts"]):
                    self._fill(layer, diff_id, reply["mounts"], fetched)
                fetched.result()  # a snapshot is committed only over a committed blob
                try:
                    self.session.call("snapshots.commit", {"snapshotter": snapshotter, "name": chain, "key": key, "labels": labels}, timeout=60)
                except AlreadyExists:
                    _remove_quietly(self.session, snapshotter, key)
                    return
            except BaseException:
                _remove_quietly(self.session, snapshotter, key)
                raise
        finally:
            if staged is not None:
                _remove_quietly(self.session, snapshotter, staged[0])
        with self.stats_lock:
            self.layers_unpacked += 1
        self.progress(layer, "unpacked")

    def _fill(self, layer: dict[str, Any], diff_id: str, mounts: list[dict[str, Any]], fetched: Future[None]) -> None:
        """Apply a layer onto a snapshot's mounts: while it downloads when possible, else from the store."""
        target = apply_target(mounts)
        if target is not None and self._apply_streamed(layer, diff_id, target, fetched):
            return
        fetched.result()
        self._apply(layer, diff_id, mounts)

    def _apply_streamed(self, layer: dict[str, Any], diff_id: str, target: tuple[str, str, list[str]], fetched: Future[None]) -> bool:
        """Apply the layer as its download arrives (through a FIFO the download feeds); False
        when the download is not fresh or the stream failed (the directory is emptied again)."""
        tee = self.tees.get(layer["digest"])
        if tee is None or fetched.done():
            return False
        fifo_dir = tempfile.mkdtemp(prefix="moord-tee-")
        fifo = os.path.join(fifo_dir, "layer")
        try:
            os.mkfifo(fifo, 0o600)
            if not self.workers.reserve():
                return False  # every worker busy: a stream must not wait for one
            if not tee.offer(fifo) or not tee.accepted(fetched):
                self.workers.unreserve()
                return False
            try:
                result = self.workers.apply(fifo, *target, reserved=True)
                self._check(layer, diff_id, result, True)
                return True
            except MoordError as exc:
                fetched.result()  # the download's own failure is the pull's error
                log.info("layer %s: streamed unpack failed (%s); unpacking the stored blob", layer["digest"], exc)
                _empty_directory(target[0])
                return False
        finally:
            shutil.rmtree(fifo_dir, ignore_errors=True)

    def _stored_path(self, layer: dict[str, Any]) -> str | None:
        """The content store's file of a layer this namespace owns (None: not on this host's disk)."""
        self.session.call("content.info", {"digest": layer["digest"]})  # NotFound unless owned
        path = blob_path(self.root, layer["digest"])
        return path if os.path.isfile(path) else None

    def _apply(self, layer: dict[str, Any], diff_id: str, mounts: list[dict[str, Any]]) -> None:
        target = apply_target(mounts)
        path = self._stored_path(layer) if target is not None else None
        if path is not None and target is not None:
            result = self.workers.apply(path, *target)
            self._check(layer, diff_id, result, True)
            return
        stream, direct = open_layer(self.session, self.root, layer)
        with stream:
            result = apply_onto_mounts(stream, mounts)
        self._check(layer, diff_id, result, direct)

    @staticmethod
    def _check(layer: dict[str, Any], diff_id: str, result: diff.ApplyResult, direct: bool) -> None:
        if result.diff_id != diff_id:
            raise FailedPrecondition(f"layer {layer['digest']}: unpacked to diff id {result.diff_id}, the config says {diff_id}")
        if direct and result.compressed_digest and result.compressed_digest != layer["digest"]:
            raise FailedPrecondition(f"layer {layer['digest']}: the stored blob has digest {result.compressed_digest}")

    def _extract_staged(self, layer: dict[str, Any], diff_id: str, chain: str, snapshotter: str, fetched: Future[None]) -> tuple[str, str] | None:
        """Extract onto a parentless snapshot while the parent is still unpacking:
        (staging key, its directory), or None when the snapshotter cannot stage."""
        key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} staged {chain}"
        reply = self.session.call("snapshots.prepare", {"snapshotter": snapshotter, "key": key, "parent": "", "labels": {}})
        try:
            mounts = reply["mounts"]
            if len(mounts) != 1 or mounts[0].get("type") != "bind" or not mounts[0].get("source"):
                _remove_quietly(self.session, snapshotter, key)
                return None  # not a layered snapshotter: apply in order instead
            directory = mounts[0]["source"]
            if self._apply_streamed(layer, diff_id, (directory, diff.MODE_OVERLAY, []), fetched):
                return key, directory
            fetched.result()
            path = self._stored_path(layer)
            if path is not None:
                result, direct = self.workers.apply(path, directory, diff.MODE_OVERLAY), True
            else:
                stream, direct = open_layer(self.session, self.root, layer)
                with stream:
                    result = diff.apply_layer(stream, directory, mode=diff.MODE_OVERLAY)
            self._check(layer, diff_id, result, direct)
            return key, directory
        except BaseException:
            _remove_quietly(self.session, snapshotter, key)
            raise

    @staticmethod
    def _swap_in(staged_dir: str, mounts: list[dict[str, Any]]) -> bool:
        """Exchange a staged directory with a fresh snapshot's empty upperdir."""
        from moord.linux.files import exchange_paths

        layers = diff.layers_from_mounts(mounts)
        if layers is None:
            return False
        upper = layers[0]
        if os.listdir(upper):
            return False
        exchange_paths(staged_dir, upper)
        return True

    # the whole pull

    def run(self) -> PullReply:
        """Resolve, plan, download and unpack in a pipeline, then write the documents and the image."""
        self.progress({"digest": "", "mediaType": ""}, "resolving")
        root = self.registry.resolve(self.ref)
        self.progress(root, "resolved")
        plan = self.plan(root)
        layers: dict[str, dict[str, Any]] = {}
        for manifest in plan.manifests:
            for layer in manifest.layers:
                layers.setdefault(layer["digest"], layer)
        for layer in layers.values():
            self.progress(layer, "waiting")
        unpack_targets = self._unpack_targets(plan)
        for manifest in unpack_targets:
            for layer in manifest.layers:
                self.tees.setdefault(layer["digest"], Tee())
        chain_ids: dict[str, str] = {}
        # One unpack thread per layer: a staged layer waits for its parent holding a thread,
        # and must not keep later layers from starting (the worker processes bound the CPU).
        unpack_threads = max(1, min(MAX_UNPACK_THREADS, sum(len(m.layers) for m in unpack_targets)))
        with ThreadPoolExecutor(self.download_workers, thread_name_prefix="pull-fetch") as fetch_pool, \
                ThreadPoolExecutor(unpack_threads, thread_name_prefix="pull-unpack") as unpack_pool:
            fetched = {digest: fetch_pool.submit(self.fetch_blob, layer) for digest, layer in layers.items()}
            unpacks: list[tuple[ManifestPlan, list[Future[str]]]] = []
            try:
                for manifest in unpack_targets:
                    unpacks.append((manifest, self.unpack_layers(manifest, fetched, unpack_pool, self.request.snapshotter)))
                for future in fetched.values():
                    future.result()
                for manifest, jobs in unpacks:
                    for job in jobs:
                        job.result()
                    top = jobs[-1].result()
                    platform = manifest.platform or oci.host_platform()
                    chain_ids[f"{platform.get('os')}/{platform.get('architecture')}"] = top
                    config = manifest.config_desc
                    self.session.update_labels(config["digest"], config["size"], {f"{GC_REF_SNAPSHOT}.{self.request.snapshotter}": top})
            except BaseException:
                self.failed.set()
                for future in fetched.values():
                    future.cancel()
                raise
        for manifest in plan.manifests:
            self._write_document(manifest.desc, manifest.data, manifest.doc)
        for desc, data, doc in reversed(plan.indexes):
            self._write_document(desc, data, doc)
        image = save_image(self.session, str(self.ref), root)
        return PullReply(
            image=image, chain_ids=chain_ids, blobs_fetched=self.blobs_fetched,
            bytes_fetched=self.bytes_fetched, layers_unpacked=self.layers_unpacked,
        )

    def _unpack_targets(self, plan: PullPlan) -> list[ManifestPlan]:
        if not self.request.unpack:
            return []
        if not self.request.all_platforms:
            return plan.manifests
        host = oci.host_platform()
        return [m for m in plan.manifests if m.platform is None or oci.platform_matches(m.platform, host)][:1]

    def _write_document(self, desc: dict[str, Any], data: bytes, doc: dict[str, Any]) -> None:
        labels = {**child_labels(doc, desc["mediaType"]), **self.merged_source(desc["digest"])}
        if write_blob(self.session, desc["digest"], len(data), lambda: io.BytesIO(data), labels):
            self._count(len(data))


# -- push -----------------------------------------------------------------------------


class Push:
    """One transfer.push: blobs first (skipping those the registry has), manifests, then the tag."""

    def __init__(self, session: Session, registry: "RegistryClient", root: str, request: PushImage, progress: Progress) -> None:
        from moord.oci.reference import parse_reference

        self.session = session
        self.registry = registry
        self.root = root
        self.request = request
        self.progress = progress
        self.ref = parse_reference(request.ref or request.name)
        self.blobs_pushed = 0
        self.bytes_pushed = 0

    def _document(self, desc: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        data = read_small_blob(self.session, desc["digest"], _kind_prefix(desc.get("mediaType", "")))
        try:
            return data, oci.load_document(data, f"{_kind_prefix(desc.get('mediaType', ''))} {desc['digest']}")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    def _mount_source(self, desc: dict[str, Any]) -> "Reference | None":
        """A repository on the same registry that already has the blob (from its source label)."""
        from moord.oci.reference import parse_reference

        try:
            info = self.session.call("content.info", {"digest": desc["digest"]})["info"]
        except NotFound:
            return None
        key, _ = self.registry.source_label(self.ref)
        repo = info.get("labels", {}).get(key)
        if not repo or repo == self.ref.repository:
            return None
        try:
            return parse_reference(f"{self.ref.host}/{repo.split(',')[0]}")
        except InvalidArgument:
            return None

    def _push_blob(self, desc: dict[str, Any]) -> None:
        if self.registry.blob_exists(self.ref, desc):
            self.progress(desc, "exists", desc["size"])
            return
        self.progress(desc, "pushing")

        def open_stream() -> Any:
            return open_layer(self.session, self.root, desc)[0]

        self.registry.push_blob(self.ref, desc, open_stream, mount_from=self._mount_source(desc), chunk_size=self.request.chunk_size or None)
        self.blobs_pushed += 1
        self.bytes_pushed += int(desc["size"])
        self.progress(desc, "pushed", desc["size"])

    def _push_manifest(self, desc: dict[str, Any], data: bytes, doc: dict[str, Any]) -> None:
        self._push_blob(validate_descriptor(doc.get("config"), "manifest config"))
        for layer in doc.get("layers", []):
            self._push_blob(validate_descriptor(layer, "manifest layers"))
        self.registry.push_manifest(self.ref, desc["mediaType"], data, desc["digest"])
        self.progress(desc, "pushed", len(data))

    def run(self) -> PushReply:
        """Push the image's tree below its target and tag it."""
        image = self.session.call("images.get", {"name": self.request.name})["image"]
        target = image["target"]
        root = {"mediaType": target["media_type"], "digest": target["digest"], "size": target["size"]}
        data, doc = self._document(root)
        root["mediaType"] = _document_type(root, doc)
        tag = self.ref.tag or root["digest"]
        if root["mediaType"] in oci.MANIFEST_TYPES:
            self._push_manifest(root, data, doc)
            self.registry.push_manifest(self.ref, root["mediaType"], data, tag)
            return PushReply(digest=root["digest"], blobs_pushed=self.blobs_pushed, bytes_pushed=self.bytes_pushed)
        wanted = [] if self.request.all_platforms and not self.request.platforms else [oci.parse_platform(p) for p in self.request.platforms] or [oci.host_platform()]
        pushed_root = root
        for entry in doc.get("manifests", []):
            child = validate_descriptor(entry, f"index {root['digest']}")
            if wanted and not any(oci.platform_matches(entry.get("platform"), w) for w in wanted):
                continue
            try:
                child_data, child_doc = self._document(child)
            except NotFound:
                if wanted:
                    raise
                raise FailedPrecondition(
                    f"{self.request.name}: manifest {child['digest']} is not in the content store; push one platform with --platform"
                ) from None
            child["mediaType"] = _document_type(child, child_doc)
            if child["mediaType"] in oci.INDEX_TYPES:
                raise InvalidArgument(f"{self.request.name}: nested indexes cannot be pushed")
            self._push_manifest(child, child_data, child_doc)
            if wanted:
                # A subset of platforms: the tag names the matching manifest itself, so
                # the registry never holds an index that names manifests it lacks.
                pushed_root = child
                data = child_data
                break
        self.registry.push_manifest(self.ref, pushed_root["mediaType"], data, tag)
        return PushReply(digest=pushed_root["digest"], blobs_pushed=self.blobs_pushed, bytes_pushed=self.bytes_pushed)


# -- the actor ------------------------------------------------------------------------


class PullActor(PooledServiceActor):
    """Serves transfer.pull and transfer.push; one registry client shared by all of them."""

    workers = 4

    def __init__(self, config: Config, client: Client, publish: Callable[[str, str, Any], None] | None) -> None:
        super().__init__()
        self.config = config
        self.client = client
        self.publish = publish
        self.inflight = InFlight()
        self.apply_workers = ApplyWorkers(UNPACK_WORKERS)
        self._registry: RegistryClient | None = None
        self._registry_lock = threading.Lock()

    def registry(self) -> "RegistryClient":
        """The registry client, built on first use (httpx is imported only when a pull comes)."""
        with self._registry_lock:
            if self._registry is None:
                from moord.actors.registry.client import RegistryClient

                self._registry = RegistryClient(self.config.plugins.registry)
            return self._registry

    @handles("transfer.pull")
    def pull(self, request: PullImage, ctx: CallContext) -> object:
        """Pull an image from a registry, unpacking as layers arrive."""
        def work() -> PullReply:
            registry = self.registry()
            with self._lease(ctx) as lease:
                session = Session(self.client, ctx.namespace, lease)
                progress = Progress(self.publish, ctx.namespace, request.operation, request.ref)
                workers = self.config.plugins.registry.max_concurrent_downloads
                return Pull(session, registry, self.config.root, request, self.inflight, progress, workers, self.apply_workers).run()

        return self.run_later(ctx, work)

    @handles("transfer.push")
    def push(self, request: PushImage, ctx: CallContext) -> object:
        """Push a local image to a registry."""
        def work() -> PushReply:
            registry = self.registry()
            session = Session(self.client, ctx.namespace, ctx.lease)
            progress = Progress(self.publish, ctx.namespace, request.operation, request.ref or request.name)
            return Push(session, registry, self.config.root, request, progress).run()

        return self.run_later(ctx, work)

    def on_start(self) -> None:
        """Build the registry client in the background once the daemon has settled: its
        imports (httpx, TLS) would otherwise cost the first pull ~0.3 s."""
        super().on_start()
        warm = threading.Timer(REGISTRY_WARMUP_DELAY, self._warm_registry)
        warm.daemon = True
        warm.start()

    def _warm_registry(self) -> None:
        try:
            from moord.actors.registry.hosts import default_tls_context

            self.registry()
            default_tls_context()
        except Exception as exc:  # a bad registry config is reported by the first pull
            log.debug("registry client warm-up: %s", exc)

    def on_stop(self) -> None:
        """Stop the apply workers with the actor."""
        super().on_stop()
        self.apply_workers.close()

    def _lease(self, ctx: CallContext) -> Any:
        import contextlib

        if ctx.lease:
            return contextlib.nullcontext(ctx.lease)
        return self.client.temporary_lease(ctx.namespace)
