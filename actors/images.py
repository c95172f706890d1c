"""The images process: import archives into content and images, unpack into snapshots,
export, check and measure images.

Every kind runs on a small worker pool (the handler answers DEFERRED), so a long import
does not block the actor's mailbox and two unpacks can proceed side by side. Every call
to the other processes carries the caller's namespace and lease. Archive formats
(OCI layout, docker-archive), export, check and usage live in actors/archive.py; this
module holds what they share: writing blobs, reading documents, the unpack.

Import (containerd's `ctr images import`): blobs are written bottom-up (layers and
config before the manifest that names them, manifests before their index), each
through `content.write` stat/write/commit in chunks of at most 4 MiB; a parent gets
its `containerd.io/gc.ref.content.*` labels at commit, or through `content.update`
when the store had it already. Then `images.create`, or `images.update` when the
name exists, then the unpack.

Unpack (containerd's unpacker, CONTAINERD_FACTS "ctr images pull" step 7): per layer,
`snapshots.stat(chainID)`; when absent, prepare `extract-<nanos>-<rand> <chainID>`,
apply the layer onto its mounts, check the diff ID, commit as chainID; any failure
removes the active snapshot.

Layer bytes are read straight from the content store's blob file (opened read-only,
without following symlinks) once `content.info` has confirmed that the namespace owns
the blob; the compressed digest is checked as the layer is applied. Through
`content.read` every 4 MiB costs a ZeroMQ round trip and two copies; the file needs
neither (see tests/test_images.py for the measured difference). When the file is not
there the layer is streamed through `content.read`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import secrets
import time
from typing import Any, BinaryIO, Callable, ContextManager

from moord.actors import diff
from moord.actors.base import CallContext, PooledServiceActor, handles
from moord.bus.client import Client
from moord.config.model import Config
from moord.messages.content import MAX_CHUNK_BYTES
from moord.messages.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MoordError,
    NotFound,
    Unavailable,
)
from moord.messages.images import Image
from moord.messages.transfer import (
    CheckImages,
    CheckReply,
    ExportImages,
    ExportReply,
    ImageUsage,
    ImportArchive,
    ImportReply,
    UnpackImage,
    UnpackReply,
    UsageReply,
)
from moord.oci import image as oci
from moord.oci.layout import OciLayout, children, digest_hex, validate_descriptor

log = logging.getLogger(__name__)

CONTENT_DIR = "io.containerd.content.v1.content"
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
GC_REF_CONTENT = "containerd.io/gc.ref.content"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot"
WORKERS = 2
# A ref locked by another writer (a concurrent import of the same blob): retry this long.
LOCKED_RETRY_SECONDS = 30.0


class Session:
    """Calls to the other processes on behalf of one request (its namespace and lease)."""

    def __init__(self, client: Client, namespace: str, lease: str) -> None:
        self.client = client
        self.namespace = namespace
        self.lease = lease

    def call(self, kind: str, payload: dict[str, Any], frames: list[bytes] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """One request; typed errors raise."""
        return self.client.call(kind, payload, frames=frames or (), namespace=self.namespace, lease=self.lease, timeout=timeout)

    def read(self, digest: str, offset: int, size: int = 0) -> tuple[bytes, int]:
        """A chunk of a blob through content.read: (bytes, size of the whole blob)."""
        reply, frames = self.client.call_frames(
            "content.read", {"digest": digest, "offset": offset, "size": size}, namespace=self.namespace, lease=self.lease
        )
        return (bytes(frames[0]) if frames else b""), int(reply.get("size", 0))

    def update_labels(self, digest: str, size: int, labels: dict[str, str]) -> None:
        """Set some labels of a blob, leaving its others alone."""
        if labels:
            self.call(
                "content.update",
                {"info": {"digest": digest, "size": size, "labels": labels}, "update_mask": [f"labels.{k}" for k in labels]},
            )


class ContentStream(io.RawIOBase):
    """A blob read sequentially through content.read (4 MiB per round trip)."""

    def __init__(self, session: Session, digest: str) -> None:
        super().__init__()
        self._session = session
        self._digest = digest
        self._offset = 0
        self._size: int | None = None
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if not self._pending:
            if self._size is not None and self._offset >= self._size:
                return 0
            data, self._size = self._session.read(self._digest, self._offset)
            if not data:
                return 0
            self._offset += len(data)
            self._pending = data
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def blob_path(root: str, digest: str) -> str:
    """Where the content store keeps a committed blob."""
    return os.path.join(root, CONTENT_DIR, "blobs", "sha256", digest_hex(digest))


class ImagesActor(PooledServiceActor):
    """Serves transfer.import, .unpack, .export, .check and .usage."""

    workers = WORKERS

    def __init__(self, config: Config, client: Client) -> None:
        super().__init__()
        self.config = config
        self.client = client

    def _lease(self, ctx: CallContext) -> ContextManager[str]:
        """The caller's lease, or a temporary one: a collection mid-import must not take
        blobs and snapshots that nothing references yet."""
        if ctx.lease:
            return contextlib.nullcontext(ctx.lease)
        return self.client.temporary_lease(ctx.namespace)

    @handles("transfer.import")
    def import_archive(self, request: ImportArchive, ctx: CallContext) -> object:
        """Import an OCI layout (directory or tar) or a docker-archive; optionally unpack."""
        from moord.actors import archive

        def work() -> ImportReply:
            with self._lease(ctx) as lease:
                return archive.import_archive(Session(self.client, ctx.namespace, lease), request, self.config.root)

        return self.run_later(ctx, work)

    @handles("transfer.unpack")
    def unpack_image(self, request: UnpackImage, ctx: CallContext) -> object:
        """Unpack an image's layers for a platform (the host's by default)."""
        def work() -> UnpackReply:
            with self._lease(ctx) as lease:
                session = Session(self.client, ctx.namespace, lease)
                image = session.call("images.get", {"name": request.name})["image"]
                return unpack(session, self.config.root, image["target"], request.snapshotter, _platform(request.platform))

        return self.run_later(ctx, work)

    @handles("transfer.export")
    def export_images(self, request: ExportImages, ctx: CallContext) -> object:
        """Export images to an OCI layout (tar or directory) or a docker-archive."""
        from moord.actors import archive

        def work() -> ExportReply:
            session = Session(self.client, ctx.namespace, ctx.lease)
            return archive.export_images(session, self.config.root, request)

        return self.run_later(ctx, work)

    @handles("transfer.check")
    def check_images(self, request: CheckImages, ctx: CallContext) -> object:
        """ctr images check: each image's blobs for a platform, present or missing, and unpacked."""
        from moord.actors import archive

        def work() -> CheckReply:
            session = Session(self.client, ctx.namespace, ctx.lease)
            return CheckReply(images=archive.check_images(session, request))

        return self.run_later(ctx, work)

    @handles("transfer.usage")
    def image_usage(self, request: ImageUsage, ctx: CallContext) -> object:
        """Bytes of an image's content, and of its snapshots."""
        from moord.actors import archive

        def work() -> UsageReply:
            return archive.image_usage(Session(self.client, ctx.namespace, ctx.lease), request)

        return self.run_later(ctx, work)


def _platform(text: str) -> dict[str, str]:
    """A platform from `os/arch[/variant]`, the host's when empty."""
    if not text:
        return oci.host_platform()
    try:
        return oci.parse_platform(text)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


# -- import ---------------------------------------------------------------------------


def commit_timeout(size: int) -> float:
    """How long a commit may take: its fsync, at a slow disk's 20 MB/s, plus slack. Not more:
    a commit lost with a killed content process must fail soon enough to be retried."""
    return 10.0 + size / 20e6


def write_blob(session: Session, digest: str, size: int, open_stream: Callable[[], BinaryIO], labels: dict[str, str]) -> bool:
    """Put a blob into the content store (labels set at commit); False when it was there already."""
    ref = f"import-{digest}"
    writer = f"images-{os.getpid()}-{secrets.token_hex(8)}"
    base = {"ref": ref, "total": size, "expected": digest, "writer": writer}
    delay, deadline = 0.016, time.monotonic() + LOCKED_RETRY_SECONDS
    while True:
        try:
            session.call("content.write", {**base, "action": "stat"})
            break
        except AlreadyExists:
            session.update_labels(digest, size, labels)
            return False
        except Unavailable:
            # Another writer holds the ref (the same blob imported concurrently).
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    try:
        offset = 0
        with open_stream() as stream:
            while True:
                chunk = stream.read(MAX_CHUNK_BYTES)
                if not chunk:
                    break
                session.call("content.write", {**base, "action": "write", "offset": offset}, frames=[chunk], timeout=60)
                offset += len(chunk)
        session.call("content.write", {**base, "action": "commit", "offset": offset, "labels": labels}, timeout=commit_timeout(size))
    except AlreadyExists:
        session.update_labels(digest, size, labels)
        return False
    except BaseException:
        try:
            session.call("content.abort", {"ref": ref})
        except MoordError:
            pass
        raise
    return True


def child_labels(doc: dict[str, Any], media_type: str) -> dict[str, str]:
    """containerd's gc.ref labels of an index or manifest: every child, fetched or not."""
    labels: dict[str, str] = {}
    if media_type in oci.INDEX_TYPES:
        for i, entry in enumerate(doc.get("manifests", [])):
            labels[f"{GC_REF_CONTENT}.m.{i}"] = entry["digest"]
    elif media_type in oci.MANIFEST_TYPES:
        if "config" in doc:
            labels[f"{GC_REF_CONTENT}.config"] = doc["config"]["digest"]
        for i, entry in enumerate(doc.get("layers", [])):
            labels[f"{GC_REF_CONTENT}.l.{i}"] = entry["digest"]
    return labels


def _media_type(desc: dict[str, Any], doc: dict[str, Any]) -> str:
    media_type = desc.get("mediaType") or doc.get("mediaType") or ""
    if not media_type:  # Docker-style documents may omit it: guess from the shape
        media_type = oci.MEDIA_TYPE_OCI_INDEX if "manifests" in doc else oci.MEDIA_TYPE_OCI_MANIFEST
    return str(media_type)


def import_tree(session: Session, layout: OciLayout, desc: dict[str, Any], depth: int = 0) -> None:
    """Write a descriptor's blob and everything below it, children first."""
    if depth > 4:
        raise InvalidArgument(f"{layout.path}: indexes nested too deep")
    digest, size = desc["digest"], desc["size"]
    media_type = desc.get("mediaType", "")
    if media_type in oci.INDEX_TYPES or media_type in oci.MANIFEST_TYPES or not media_type:
        data, doc = layout.read_document(digest, size, "index" if media_type in oci.INDEX_TYPES else "manifest")
        media_type = _media_type(desc, doc)
        kids = children(doc, media_type, f"{layout.path}: {digest}")
        for child in kids:
            child_type = child.get("mediaType", "")
            present = layout.has_blob(child["digest"])
            if not present and (child_type in oci.INDEX_TYPES or child_type in oci.MANIFEST_TYPES):
                continue  # another platform's manifest, not in this layout: a dangling label is normal
            if not present:
                raise InvalidArgument(f"{layout.path}: blob {child['digest']} ({child_type or 'unknown type'}) is missing")
            import_tree(session, layout, child, depth + 1)
        write_blob(session, digest, size, lambda: io.BytesIO(data), child_labels(doc, media_type))
    else:
        write_blob(session, digest, size, lambda: layout.open_blob(digest, size), {})


def _wire_descriptor(desc: dict[str, Any]) -> dict[str, Any]:
    """An OCI JSON descriptor as the messages' Descriptor."""
    return {
        "media_type": desc.get("mediaType", ""),
        "digest": desc["digest"],
        "size": desc["size"],
        "annotations": dict(desc.get("annotations") or {}),
    }


def save_image(session: Session, name: str, target: dict[str, Any]) -> Image:
    """images.create, or images.update of the target when the name exists."""
    record = {"name": name, "target": _wire_descriptor(target), "labels": {}}
    try:
        reply = session.call("images.create", {"image": record})
    except AlreadyExists:
        reply = session.call("images.update", {"image": record, "update_mask": ["target"]})
    return Image.model_validate(reply["image"])


# -- unpack ---------------------------------------------------------------------------


def read_small_blob(session: Session, digest: str, what: str) -> bytes:
    """The exact bytes of a stored index, manifest or config (at most 4 MiB, digest checked)."""
    chunks: list[bytes] = []
    offset, total = 0, None
    while total is None or offset < total:
        data, total = session.read(digest, offset)
        if total > oci.MAX_MANIFEST_BYTES:
            raise InvalidArgument(f"{what} {digest} has {total} bytes, more than the {oci.MAX_MANIFEST_BYTES}-byte limit")
        if not data:
            break
        chunks.append(data)
        offset += len(data)
    blob = b"".join(chunks)
    if "sha256:" + hashlib.sha256(blob).hexdigest() != digest:
        raise FailedPrecondition(f"{what} {digest}: content does not match its digest")
    return blob


def read_document(session: Session, desc: dict[str, Any], what: str) -> dict[str, Any]:
    """An index, manifest or config from the content store, parsed."""
    blob = read_small_blob(session, desc["digest"], what)
    try:
        return oci.load_document(blob, f"{what} {desc['digest']}")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def find_manifest(session: Session, target: dict[str, Any], wanted: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest for a platform (the host's) below `target`: (its descriptor, the manifest).

    In an index, entries whose platform matches come first, then entries without a
    platform (as containerd's matcher orders them); NotFound when none fits.
    """
    wanted = wanted or oci.host_platform()
    desc = {
        "mediaType": target.get("media_type", target.get("mediaType", "")),
        "digest": target["digest"],
        "size": target.get("size", 0),
    }
    for _ in range(4):  # an index may name an index; stop at a sane depth
        if desc["mediaType"] not in oci.INDEX_TYPES:
            break
        index = read_document(session, desc, "index")
        entries = [m for m in index.get("manifests", []) if isinstance(m, dict)]
        matches = [m for m in entries if oci.platform_matches(m.get("platform"), wanted)]
        matches += [m for m in entries if not m.get("platform")]
        if not matches:
            raise NotFound(f"image {target['digest']} has no manifest for platform {wanted['os']}/{wanted['architecture']}")
        desc = validate_descriptor(matches[0], "index")
    return desc, read_document(session, desc, "manifest")


def resolve_manifest(session: Session, target: dict[str, Any], wanted: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest for a platform (the host's) below `target`, and its config: (manifest, config)."""
    _, manifest = find_manifest(session, target, wanted)
    config_desc = validate_descriptor(manifest.get("config"), "manifest config")
    config = read_document(session, config_desc, "image config")
    return manifest, config


def open_layer(session: Session, root: str, layer: dict[str, Any]) -> tuple[BinaryIO, bool]:
    """A stream of a layer blob this namespace owns: (stream, read straight from the file)."""
    session.call("content.info", {"digest": layer["digest"]})  # NotFound unless this namespace owns it
    try:
        fd = os.open(blob_path(root, layer["digest"]), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return io.BufferedReader(ContentStream(session, layer["digest"]), MAX_CHUNK_BYTES), False  # type: ignore[return-value]
    return os.fdopen(fd, "rb", buffering=0), True  # type: ignore[return-value]


def apply_onto_mounts(stream: BinaryIO, mounts: list[dict[str, Any]]) -> diff.ApplyResult:
    """Apply a layer onto an active snapshot's mounts (overlay: straight onto the upperdir)."""
    layers = diff.layers_from_mounts(mounts)
    if layers is not None:
        upper, lowers = layers
        return diff.apply_layer(stream, upper, mode=diff.MODE_OVERLAY, parents=lowers)
    from moord.linux.mount import mounted

    with mounted(mounts) as target:
        return diff.apply_layer(stream, target, mode=diff.MODE_NATIVE)


def unpack_layer(session: Session, root: str, snapshotter: str, layer: dict[str, Any], diff_id: str, chain: str, parent: str) -> bool:
    """Unpack one layer as committed snapshot `chain`; False when it existed already."""
    key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain}"
    labels = {LABEL_SNAPSHOT_REF: chain}
    try:
        reply = session.call("snapshots.prepare", {"snapshotter": snapshotter, "key": key, "parent": parent, "labels": labels})
    except AlreadyExists:
        return False  # another unpack committed it between our stat and prepare
    try:
        stream, direct = open_layer(session, root, layer)
        with stream:
            result = apply_onto_mounts(stream, reply["mounts"])
        if result.diff_id != diff_id:
            raise FailedPrecondition(f"layer {layer['digest']}: unpacked to diff id {result.diff_id}, the config says {diff_id}")
        if direct and result.compressed_digest != layer["digest"]:
            raise FailedPrecondition(f"layer {layer['digest']}: the stored blob has digest {result.compressed_digest}")
        try:
            session.call("snapshots.commit", {"snapshotter": snapshotter, "name": chain, "key": key, "labels": labels}, timeout=60)
        except AlreadyExists:
            _remove_quietly(session, snapshotter, key)  # a concurrent unpack won
            return False
    except BaseException:
        _remove_quietly(session, snapshotter, key)
        raise
    return True


def _remove_quietly(session: Session, snapshotter: str, key: str) -> None:
    try:
        session.call("snapshots.remove", {"snapshotter": snapshotter, "key": key}, timeout=60)
    except MoordError as exc:
        if not isinstance(exc, NotFound):
            log.warning("could not remove snapshot %s: %s", key, exc)


def unpack(session: Session, root: str, target: dict[str, Any], snapshotter: str, wanted: dict[str, str] | None = None) -> UnpackReply:
    """transfer.unpack for one image target: every layer as a committed snapshot."""
    manifest, config = resolve_manifest(session, target, wanted)
    layers = [validate_descriptor(layer, "manifest layers") for layer in manifest.get("layers", [])]
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) or not layers:
        raise InvalidArgument(f"image {target['digest']}: {len(layers)} layers but {len(diff_ids) if isinstance(diff_ids, list) else 0} diff ids")
    for d in diff_ids:
        digest_hex(d)
    chains = oci.chain_ids(diff_ids)
    applied = 0
    parent = ""
    for layer, diff_id, chain in zip(layers, diff_ids, chains):
        try:
            session.call("snapshots.stat", {"snapshotter": snapshotter, "key": chain})
        except NotFound:
            if unpack_layer(session, root, snapshotter, layer, diff_id, chain, parent):
                applied += 1
        session.update_labels(layer["digest"], layer["size"], {LABEL_UNCOMPRESSED: diff_id})
        parent = chain
    config_desc = manifest["config"]
    session.update_labels(config_desc["digest"], config_desc["size"], {f"{GC_REF_SNAPSHOT}.{snapshotter}": chains[-1]})
    return UnpackReply(chain_id=chains[-1], layers_applied=applied)


def start(proc: Any) -> None:
    """Serve the transfer and diff kinds in the images process."""
    from moord.actors.diff_service import DiffActor
    from moord.actors.pull import PullActor

    proc.serve(ImagesActor, proc.config, proc.client)
    proc.serve(DiffActor, proc.config, proc.client)
    proc.serve(PullActor, proc.config, proc.client, proc.events.publish)
