"""The Diff service (containerd's diff plugin, walking differ and filesystem applier).

diff.apply: the layer blob is read from the content store of the caller's namespace
(straight from its file when the store has it, else through content.read) and applied
with actors/diff.apply_layer: onto the upperdir of a single overlay mount with overlay
whiteouts, otherwise onto the mounts mounted read-write. The digest and size of the
bytes read must be the descriptor's, and the compression the media type's. The answer
is the uncompressed tar's descriptor (its digest is the diff ID).

diff.diff: both mount sets are mounted read-only (an overlay with an upperdir becomes
an overlay whose top lower layer is that upperdir, as containerd does, so an active
snapshot can be diffed while it is mounted elsewhere) under <root>/tmpmounts, and
actors/layer_writer writes the changes as a tar, gzip-compressed unless the media type
says plain tar. The bytes go to the content store as they are produced, through
content.write in chunks of at most 4 MiB under one writer token, and are committed
with the caller's labels plus containerd.io/uncompressed=<diff ID>.

Both run on a small worker pool (the handler answers DEFERRED): a large layer must not
block the actor's mailbox.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import time
import zlib
from contextlib import ExitStack
from typing import Any, Callable

from moord.actors.base import CallContext, PooledServiceActor, handles
from moord.actors.images import LABEL_UNCOMPRESSED, Session, apply_onto_mounts, open_layer
from moord.actors.layer_writer import write_layer
from moord.bus.client import Client
from moord.config.model import Config
from moord.linux.mount import mounted
from moord.messages.content import MAX_CHUNK_BYTES
from moord.messages.diff import ApplyDiff, ApplyReply, DiffReply, MakeDiff
from moord.messages.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MoordError,
    Unimplemented,
)
from moord.messages.types import Descriptor, Mount
from moord.oci import image as oci

log = logging.getLogger(__name__)

WORKERS = 2
TEMP_MOUNTS = "tmpmounts"
# containerd's gzip writer uses the default compression level.
GZIP_LEVEL = 6

# Layer media types the applier reads, and the compression each one promises.
LAYER_COMPRESSION: dict[str, str] = {
    oci.MEDIA_TYPE_OCI_LAYER: "none",
    oci.MEDIA_TYPE_OCI_LAYER_GZIP: "gzip",
    oci.MEDIA_TYPE_OCI_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    oci.MEDIA_TYPE_DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
# What diff.diff writes.
DIFF_MEDIA_TYPES = (oci.MEDIA_TYPE_OCI_LAYER, oci.MEDIA_TYPE_OCI_LAYER_GZIP)


class DiffActor(PooledServiceActor):
    """Serves diff.apply and diff.diff."""

    workers = WORKERS

    def __init__(self, config: Config, client: Client) -> None:
        super().__init__()
        self.config = config
        self.client = client

    def on_start(self) -> None:
        """Undo the temporary mounts of diffs that a crash of this process interrupted."""
        super().on_start()
        clean_temp_mounts(os.path.join(self.config.root, TEMP_MOUNTS))

    def _defer(self, ctx: CallContext, work: Callable[[Session], Any]) -> object:
        session = Session(self.client, ctx.namespace, ctx.lease)
        return self.run_later(ctx, lambda: work(session))

    @handles("diff.apply")
    def apply(self, request: ApplyDiff, ctx: CallContext) -> object:
        """Apply a layer blob onto mounts."""
        return self._defer(ctx, lambda session: apply_diff(session, self.config.root, request))

    @handles("diff.diff")
    def diff(self, request: MakeDiff, ctx: CallContext) -> object:
        """Write the changes between two mount sets as a layer blob."""
        return self._defer(ctx, lambda session: make_diff(session, self.config.root, request))


# -- apply ----------------------------------------------------------------------------


def _mount_error(exc: OSError, what: str) -> MoordError:
    """A mount that fails for the caller's reasons is InvalidArgument; the host's, Internal."""
    text = f"{what}: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL, errno.ENODEV, errno.E2BIG, errno.EOPNOTSUPP):
        return InvalidArgument(text)
    return Internal(text)


def apply_diff(session: Session, root: str, request: ApplyDiff) -> ApplyReply:
    """diff.apply: the layer onto the mounts; the uncompressed descriptor back."""
    desc = request.diff
    expected_compression = LAYER_COMPRESSION.get(desc.media_type)
    if expected_compression is None:
        raise Unimplemented(f"no stream processor for media type {desc.media_type!r}")
    # Payloads feed stream processors (decryption); none of the types above has one.
    layer = {"digest": desc.digest, "size": desc.size, "mediaType": desc.media_type}
    stream, _ = open_layer(session, root, layer)
    try:
        with stream:
            result = apply_onto_mounts(stream, [m.model_dump() for m in request.mounts])
    except OSError as exc:  # the applier types its own errors: what is left is mounting
        raise _mount_error(exc, "mounting the target") from None
    if result.compressed_digest != desc.digest or result.compressed_size != desc.size:
        raise FailedPrecondition(
            f"layer {desc.digest} ({desc.size} bytes): read {result.compressed_size} bytes with digest {result.compressed_digest}"
        )
    if result.compression != expected_compression:
        raise InvalidArgument(f"layer {desc.digest}: media type {desc.media_type} but the blob is {result.compression}-compressed")
    return ApplyReply(applied=Descriptor(media_type=oci.MEDIA_TYPE_OCI_LAYER, digest=result.diff_id, size=result.size))


# -- diff -----------------------------------------------------------------------------


def readonly_mounts(mounts: list[Mount]) -> list[dict[str, Any]]:
    """The mounts made read-only; an overlay's upperdir becomes its top lower layer."""
    result = []
    for m in mounts:
        options = [o for o in m.options if o not in ("rw", "ro")]
        if m.type == "overlay":
            upper = next((o[len("upperdir="):] for o in options if o.startswith("upperdir=")), "")
            if upper:
                lower = next((o[len("lowerdir="):] for o in options if o.startswith("lowerdir=")), "")
                kept = [o for o in options if not o.startswith(("upperdir=", "workdir=", "lowerdir="))]
                options = [*kept, "lowerdir=" + (f"{upper}:{lower}" if lower else upper)]
        result.append({"type": m.type, "source": m.source, "target": m.target, "options": [*options, "ro"]})
    return result


class ContentUpload:
    """One blob streamed into the content store: chunks of at most 4 MiB, one writer token."""

    def __init__(self, session: Session, ref: str) -> None:
        self.session = session
        self.ref = ref
        self.writer = f"diff-{os.getpid()}-{secrets.token_hex(8)}"
        self.hash = hashlib.sha256()
        self.offset = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._call("stat")

    def _call(self, action: str, frames: list[bytes] | None = None, **fields: Any) -> dict[str, Any]:
        payload = {"action": action, "ref": self.ref, "writer": self.writer, **fields}
        return self.session.call("content.write", payload, frames=frames, timeout=120)

    def write(self, data: bytes) -> None:
        """Queue bytes; full chunks are sent as they fill."""
        if not data:
            return
        self.hash.update(data)
        self._pending.append(data)
        self._pending_size += len(data)
        while self._pending_size >= MAX_CHUNK_BYTES:
            self._send(MAX_CHUNK_BYTES)

    def _send(self, size: int) -> None:
        joined = b"".join(self._pending)
        chunk, rest = joined[:size], joined[size:]
        self._pending, self._pending_size = ([rest] if rest else []), len(rest)
        # Offset 0 on the first write restarts a caller-named ingest (containerd truncates it).
        self._call("write", [chunk], offset=self.offset)
        self.offset += len(chunk)

    def commit(self, labels: dict[str, str]) -> str:
        """Send what is left and commit; the blob's digest (committed before is fine too)."""
        if self._pending_size:
            self._send(self._pending_size)
        digest = "sha256:" + self.hash.hexdigest()
        try:
            self._call("commit", offset=self.offset, total=self.offset, expected=digest, labels=labels)
        except AlreadyExists:
            pass  # the same layer was written before: it is the answer all the same
        return digest

    def abandon(self, owned_ref: bool) -> None:
        """After a failure: abort an ingest we named, only release one the caller named."""
        try:
            if owned_ref:
                self.session.call("content.abort", {"ref": self.ref})
            else:
                self._call("close")
        except MoordError as exc:
            log.warning("diff upload %s: %s", self.ref, exc)


def _unique_ref() -> str:
    return f"diff-{time.time_ns()}-{secrets.token_hex(4)}"


def clean_temp_mounts(parent: str) -> None:
    """Unmount and remove what diffs left under `parent` (none run yet: the process just started)."""
    from moord.linux.mount import unmount_all

    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            unmount_all(path, detach=True)
            os.rmdir(path)
        except OSError as exc:
            log.warning("could not clean up %s: %s", path, exc)


def make_diff(session: Session, root: str, request: MakeDiff) -> DiffReply:
    """diff.diff: mount both sides read-only, write the layer, store it, answer its descriptor."""
    media_type = request.media_type or oci.MEDIA_TYPE_OCI_LAYER_GZIP
    if media_type not in DIFF_MEDIA_TYPES:
        raise Unimplemented(f"unsupported diff media type: {media_type}")
    parent = os.path.join(root, TEMP_MOUNTS)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    ref = request.ref or _unique_ref()
    with ExitStack() as stack:
        try:
            left = stack.enter_context(mounted(readonly_mounts(request.left), parent)) if request.left else None
            right = stack.enter_context(mounted(readonly_mounts(request.right), parent))
        except OSError as exc:
            raise _mount_error(exc, "mounting the diff's sides") from None
        upload = ContentUpload(session, ref)
        try:
            if media_type == oci.MEDIA_TYPE_OCI_LAYER_GZIP:
                compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
                stats = write_layer(left, right, lambda data: upload.write(compressor.compress(data)))
                upload.write(compressor.flush())
            else:
                stats = write_layer(left, right, upload.write)
            labels = {**request.labels, LABEL_UNCOMPRESSED: stats.diff_id}
            digest = upload.commit(labels)
        except BaseException:
            upload.abandon(owned_ref=not request.ref)
            raise
    info = session.call("content.info", {"digest": digest})["info"]
    if LABEL_UNCOMPRESSED not in (info.get("labels") or {}):
        session.update_labels(digest, int(info["size"]), {LABEL_UNCOMPRESSED: stats.diff_id})
    log.info("diff %s: %d entries, %d bytes uncompressed (%s)", digest, stats.entries, stats.size, stats.diff_id)
    return DiffReply(diff=Descriptor(media_type=media_type, digest=digest, size=int(info["size"])))

