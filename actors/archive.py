"""Archives in and out of the images process, and the image checks that read content.

Import (`transfer.import`) detects the format: a tree with `oci-layout` is an OCI image
layout (containerd prefers it when an archive has both, as `ctr images export` writes
both); a tree with only `manifest.json` is a docker-archive. A docker-archive is checked
whole before anything is written: manifest.json's shape, every config and layer present,
every config a JSON object with one diff ID per layer; every blob is hashed first (its
digest is what its bytes say, never what a name claims), and an uncompressed layer whose
digest is not its diff ID is refused there. Blobs then go into the content store
through `write_blob`, whose commit the content store checks against the digest.

Export (`transfer.export`) walks each image as containerd's exporter does (an index:
the manifests matching the platforms, or all of them with all_platforms; other
platforms' manifests are skipped, present or not), reads blobs straight from the
content store's files (after `content.info` proved this namespace owns them) verifying
each digest while copying, and writes through `ArchiveWriter`, so a failed export
leaves nothing behind.

Check and usage follow containerd's images.Check and image.Usage.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

from moord.actors import diff
from moord.actors.images import (
    GC_REF_SNAPSHOT,
    Session,
    _wire_descriptor,
    child_labels,
    find_manifest,
    import_tree,
    open_layer,
    read_document,
    save_image,
    unpack,
    write_blob,
)
from moord.messages.errors import FailedPrecondition, InvalidArgument, MoordError, NotFound
from moord.messages.images import Image
from moord.messages.transfer import (
    CheckedImage,
    CheckImages,
    ExportImages,
    ExportReply,
    ImageUsage,
    ImportArchive,
    ImportReply,
    UsageReply,
)
from moord.oci import docker_archive as docker
from moord.oci import image as oci
from moord.oci.layout import (
    CONTAINERD_NAME_ANNOTATION,
    INDEX_FILE,
    LAYOUT_FILE,
    LAYOUT_VERSION,
    ArchiveFiles,
    ArchiveWriter,
    OciLayout,
    Record,
    VerifiedReader,
    bytes_record,
    digest_hex,
    validate_descriptor,
)

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
MAX_DEPTH = 4


# -- import ------------------------------------------------------------------------------


@dataclass
class NamedTarget:
    """An image an archive names: its name and root descriptor (OCI JSON)."""

    name: str
    target: dict[str, Any]


def import_archive(session: Session, request: ImportArchive, root: str) -> ImportReply:
    """transfer.import: detect the format, import every image, then unpack when asked."""
    if not os.path.isabs(request.path):
        raise InvalidArgument(f"import path must be absolute, got {request.path!r}")
    with ArchiveFiles(request.path) as files:
        is_oci = files.exists(LAYOUT_FILE)
        is_docker = not is_oci and files.exists(docker.MANIFEST_FILE)
        if is_docker:
            named = import_docker(session, files, request.base_name)
    if is_oci:
        named = import_oci(session, request.path, request.base_name)
    elif not is_docker:
        raise InvalidArgument(
            f"{request.path}: not an image archive: neither an OCI image layout ({LAYOUT_FILE}) "
            f"nor a docker-archive ({docker.MANIFEST_FILE})"
        )
    images = [save_image(session, entry.name, entry.target) for entry in named]
    if request.unpack:
        unpacked: set[str] = set()
        for entry in named:
            if entry.target["digest"] in unpacked:
                continue
            try:
                unpack(session, root, entry.target, request.snapshotter)
            except NotFound as exc:
                if "platform" not in exc.message:
                    raise
                log.info("%s: nothing to unpack for this platform", entry.name)
            unpacked.add(entry.target["digest"])
    return ImportReply(images=images, format="oci" if is_oci else "docker")


def import_oci(session: Session, path: str, base_name: str) -> list[NamedTarget]:
    """Write every blob an OCI layout's named images need, children first."""
    with OciLayout(path) as layout:
        named = [NamedTarget(e.name, e.target) for e in layout.images(base_name)]
        if not named:
            raise InvalidArgument(f"{path}: no image in index.json has a usable name (a tag-only ref needs base_name)")
        done: set[str] = set()
        for entry in named:
            if entry.target["digest"] not in done:
                import_tree(session, layout, entry.target)
                done.add(entry.target["digest"])
    return named


@dataclass
class _Blob:
    """A file of a docker-archive hashed: its digest, size and (for layers) media type."""

    member: str
    digest: str
    size: int
    media_type: str = ""


@dataclass
class _DockerImage:
    """One manifest.json entry converted: config bytes, layer blobs, manifest bytes, names."""

    config: bytes
    layers: list[_Blob]
    manifest: bytes
    platform: dict[str, str] | None
    names: list[str] = field(default_factory=list)


def _hash_member(files: ArchiveFiles, member: str) -> _Blob:
    """sha256 and size of a member, and the media type its first bytes say."""
    stream, size = files.open(member)
    hasher = hashlib.sha256()
    head = b""
    read = 0
    with stream:
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            if not head:
                head = chunk[:16]
            hasher.update(chunk)
            read += len(chunk)
    if read != size:
        raise InvalidArgument(f"{files.path}: {member} is truncated ({read} of {size} bytes)")
    return _Blob(member, "sha256:" + hasher.hexdigest(), size, docker.layer_media_type(head))


def _convert_docker(files: ArchiveFiles, base_name: str) -> list[_DockerImage]:
    """Read and check a whole docker-archive; nothing is written here."""
    entries = docker.read_entries(files)
    hashed: dict[str, _Blob] = {}
    converted: list[_DockerImage] = []
    for i, entry in enumerate(entries):
        config_bytes = files.read_small(entry.config, oci.MAX_MANIFEST_BYTES)
        try:
            config = oci.load_document(config_bytes, f"{files.path}: {entry.config}")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(entry.layers):
            raise InvalidArgument(
                f"{files.path}: {entry.config}: {len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff ids "
                f"for {len(entry.layers)} layers"
            )
        layers: list[_Blob] = []
        for member, diff_id in zip(entry.layers, diff_ids):
            digest_hex(diff_id)
            key = files.resolve(member) if files.is_tar else member
            if key not in hashed:
                hashed[key] = _hash_member(files, member)
            blob = hashed[key]
            if blob.media_type == docker.MEDIA_TYPE_DOCKER_LAYER and blob.digest != diff_id:
                raise InvalidArgument(f"{files.path}: layer {member[:200]} has digest {blob.digest}, its config says {diff_id}")
            layers.append(blob)
        config_desc = docker.descriptor(
            oci.MEDIA_TYPE_DOCKER_CONFIG, "sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes)
        )
        manifest = docker.schema2_manifest(config_desc, [docker.descriptor(b.media_type, b.digest, b.size) for b in layers])
        names = list(entry.repo_tags)
        if not names and base_name:
            names = [f"{base_name}@sha256:{hashlib.sha256(manifest).hexdigest()}"]
        converted.append(_DockerImage(config_bytes, layers, manifest, docker.config_platform(config), names))
    if not any(image.names for image in converted):
        raise InvalidArgument(f"{files.path}: no image in {docker.MANIFEST_FILE} has RepoTags (give base_name)")
    return converted


def import_docker(session: Session, files: ArchiveFiles, base_name: str) -> list[NamedTarget]:
    """Import a docker-archive: its layers, configs and a schema 2 manifest per image."""
    converted = _convert_docker(files, base_name)
    written: set[str] = set()
    named: list[NamedTarget] = []
    for image in converted:
        for blob in image.layers:
            if blob.digest in written:
                continue

            def opener(blob: _Blob = blob) -> BinaryIO:
                stream, _ = files.open(blob.member)
                return VerifiedReader(stream, blob.digest, blob.size, files.path)  # type: ignore[return-value]

            write_blob(session, blob.digest, blob.size, opener, {})
            written.add(blob.digest)
        manifest_doc = oci.load_document(image.manifest, "manifest")
        config_desc = manifest_doc["config"]
        write_blob(session, config_desc["digest"], config_desc["size"], lambda data=image.config: io.BytesIO(data), {})
        manifest_digest = "sha256:" + hashlib.sha256(image.manifest).hexdigest()
        write_blob(
            session, manifest_digest, len(image.manifest), lambda data=image.manifest: io.BytesIO(data),
            child_labels(manifest_doc, oci.MEDIA_TYPE_DOCKER_MANIFEST),
        )
        target = docker.descriptor(oci.MEDIA_TYPE_DOCKER_MANIFEST, manifest_digest, len(image.manifest))
        for name in image.names:
            named.append(NamedTarget(name, target))
    return named


# -- export ------------------------------------------------------------------------------


def _platforms(texts: list[str]) -> list[dict[str, str]]:
    """Parsed platform preferences; the host's when none are given."""
    try:
        return [oci.parse_platform(t) for t in texts] or [oci.host_platform()]
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _preference(platform: dict[str, Any] | None, wanted: list[dict[str, str]]) -> int | None:
    """Index of the first wanted platform a manifest's platform matches; a manifest
    without a platform matches last (as containerd's matcher sorts it); None: no match."""
    if not platform:
        return len(wanted)
    for i, want in enumerate(wanted):
        if oci.platform_matches(platform, want):
            return i
    return None


def _oci_descriptor(desc: dict[str, Any]) -> dict[str, Any]:
    """A wire Descriptor (or an image target) as OCI JSON, fields in Go's order."""
    if "mediaType" in desc:
        return dict(desc)
    return docker.descriptor(
        desc.get("media_type", ""), desc["digest"], desc["size"], annotations=dict(desc.get("annotations") or {})
    )


class Exporter:
    """Collects the records of an export: blobs read from this namespace's content store."""

    def __init__(self, session: Session, root: str) -> None:
        self.session = session
        self.root = root
        self.records: dict[str, Record] = {}
        self.size = 0

    def opener(self, desc: dict[str, Any]) -> Callable[[], BinaryIO]:
        """How to read a blob this namespace holds (checked now), its digest verified as read."""
        digest, size = desc["digest"], desc["size"]
        try:
            info = self.session.call("content.info", {"digest": digest})["info"]
        except NotFound:
            raise NotFound(f"content {digest} ({desc.get('mediaType') or 'blob'}) is not in this namespace: cannot export it") from None
        if info["size"] != size:
            raise FailedPrecondition(f"content {digest} has {info['size']} bytes, its descriptor says {size}")
        session, root = self.session, self.root

        def open_verified() -> BinaryIO:
            stream, _ = open_layer(session, root, {"digest": digest, "size": size})
            return VerifiedReader(stream, digest, size, "content store")  # type: ignore[return-value]

        return open_verified

    def add_blob(self, desc: dict[str, Any], name: str = "") -> None:
        """Add a blob (its presence checked now) as `blobs/sha256/<hex>` or `name`."""
        member = name or f"blobs/sha256/{digest_hex(desc['digest'])}"
        if member not in self.records:
            self.add(Record(member, desc["size"], self.opener(desc)))

    def add(self, record: Record) -> None:
        """Add a record (the first of a name wins)."""
        if record.name not in self.records:
            self.records[record.name] = record
            self.size += record.size

    def add_bytes(self, name: str, data: bytes) -> None:
        """Add a small file held in memory."""
        self.add(bytes_record(name, data))

    def document(self, desc: dict[str, Any], what: str) -> dict[str, Any]:
        """An index or manifest this namespace holds (NotFound when absent)."""
        return read_document(self.session, {"digest": desc["digest"]}, what)

    def walk(self, desc: dict[str, Any], depth: int = 0) -> None:
        """A descriptor's blob and everything below it (all platforms of a nested index)."""
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"{desc['digest']}: indexes nested too deep")
        validate_descriptor(desc, "export")
        self.add_blob(desc)
        media_type = desc.get("mediaType", "")
        if media_type in oci.MANIFEST_TYPES:
            manifest = self.document(desc, "manifest")
            for child in [manifest.get("config"), *(manifest.get("layers") or [])]:
                self.add_blob(validate_descriptor(child, f"manifest {desc['digest']}"))
        elif media_type in oci.INDEX_TYPES:
            for child in self.document(desc, "index").get("manifests") or []:
                self.walk(validate_descriptor(child, f"index {desc['digest']}"), depth + 1)


def _image_target(session: Session, name: str) -> dict[str, Any]:
    """An image's target as OCI JSON, with the name annotations containerd's exporter adds."""
    image = session.call("images.get", {"name": name})["image"]
    target = _oci_descriptor(image["target"])
    annotations = dict(target.get("annotations") or {})
    annotations[CONTAINERD_NAME_ANNOTATION] = name
    annotations[oci.REF_NAME_ANNOTATION] = docker.oci_ref_name(name)
    target["annotations"] = annotations
    return target


def _select(exporter: Exporter, target: dict[str, Any], wanted: list[dict[str, str]], all_platforms: bool, with_blobs: bool) -> list[dict[str, Any]]:
    """The manifests of an index for the wanted platforms, best first, their blobs added;
    other platforms' manifests added only with all_platforms."""
    index = exporter.document(target, "index")
    if with_blobs:
        exporter.add_blob(target)
    matching: list[tuple[int, int, dict[str, Any]]] = []
    for position, entry in enumerate(index.get("manifests") or []):
        entry = validate_descriptor(entry, f"index {target['digest']}")
        rank = _preference(entry.get("platform"), wanted)
        if rank is not None:
            matching.append((rank, position, entry))
            if with_blobs:
                exporter.walk(entry, 1)
        elif all_platforms and with_blobs:
            exporter.walk(entry, 1)
    return [entry for _, _, entry in sorted(matching, key=lambda m: (m[0], m[1]))]


def export_images(session: Session, root: str, request: ExportImages) -> ExportReply:
    """transfer.export: plan every record first (so a missing blob fails before writing)."""
    wanted = _platforms(request.platforms)
    if request.format == "docker":
        if request.directory:
            raise InvalidArgument("a docker-archive is a tar: --format docker cannot write a directory")
        if request.all_platforms:
            raise InvalidArgument("a docker-archive holds one platform per image: --all-platforms needs --format oci")
    _refuse_daemon_paths(request.path, root)
    writer = ArchiveWriter(request.path, request.directory, request.overwrite)
    temp_dir = ""
    try:
        exporter = Exporter(session, root)
        if request.format == "oci":
            _plan_oci(exporter, request, wanted, writer)
        else:
            temp_dir = tempfile.mkdtemp(prefix=".export-layers-", dir=os.path.dirname(writer.path))
            _plan_docker(exporter, request, wanted, temp_dir)
        writer.write(list(exporter.records.values()))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    metadata = {INDEX_FILE, LAYOUT_FILE, docker.MANIFEST_FILE, docker.REPOSITORIES_FILE}
    blobs = sum(1 for name in exporter.records if name not in metadata)
    return ExportReply(path=writer.path, format=request.format, images=list(request.names), blobs=blobs, size=exporter.size)


def _refuse_daemon_paths(path: str, root: str) -> None:
    """An export never writes into the daemon's own root (its content store, its databases)."""
    real = os.path.realpath(os.path.dirname(path.rstrip("/")) or "/")
    daemon_root = os.path.realpath(root)
    if real == daemon_root or real.startswith(daemon_root + os.sep):
        raise InvalidArgument(f"{path}: refusing to export into the daemon's root {root}")


def _plan_oci(exporter: Exporter, request: ExportImages, wanted: list[dict[str, str]], writer: ArchiveWriter) -> None:
    index_entries: list[dict[str, Any]] = []
    docker_manifests: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name in request.names:
        target = _image_target(exporter.session, name)
        index_entries.append(target)
        media_type = target.get("mediaType", "")
        if media_type in oci.MANIFEST_TYPES:
            exporter.walk(target)
            docker_manifests.setdefault(target["digest"], (target, []))[1].append(name)
        elif media_type in oci.INDEX_TYPES:
            chosen = _select(exporter, target, wanted, request.all_platforms, with_blobs=True)
            if not request.skip_manifest_json:
                if not chosen:
                    shown = ", ".join("/".join(p.values()) for p in wanted)
                    raise NotFound(f"image {name} has no manifest for platform {shown}")
                docker_manifests.setdefault(chosen[0]["digest"], (chosen[0], []))[1].append(name)
        else:
            raise InvalidArgument(f"image {name}: only manifests and indexes may be exported, not {media_type!r}")
    existing = writer.existing_index()
    if existing is not None:
        ours = {e["annotations"][CONTAINERD_NAME_ANNOTATION] for e in index_entries}
        kept = [
            e for e in existing.get("manifests") or []
            if isinstance(e, dict) and _layout_name(e) not in ours
        ]
        index_entries = kept + index_entries
    index = {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX, "manifests": index_entries}
    exporter.add_bytes(INDEX_FILE, docker.go_json(index))
    exporter.add_bytes(LAYOUT_FILE, docker.go_json({"imageLayoutVersion": LAYOUT_VERSION}))
    if docker_manifests and not request.skip_manifest_json and not request.directory:
        entries = []
        for desc, names in docker_manifests.values():
            manifest = exporter.document(desc, "manifest")
            config = validate_descriptor(manifest.get("config"), "manifest config")
            layers = [validate_descriptor(layer, "manifest layers") for layer in manifest.get("layers") or []]
            entries.append((
                f"blobs/sha256/{digest_hex(config['digest'])}",
                [f"blobs/sha256/{digest_hex(layer['digest'])}" for layer in layers],
                _familiar_names(names),
            ))
        exporter.add_bytes(docker.MANIFEST_FILE, docker.save_manifest(entries))


def _layout_name(entry: dict[str, Any]) -> str:
    annotations = entry.get("annotations") or {}
    return str(annotations.get(CONTAINERD_NAME_ANNOTATION) or annotations.get(oci.REF_NAME_ANNOTATION) or "")


def _familiar_names(names: list[str]) -> list[str]:
    tags = []
    for name in names:
        try:
            tags.append(docker.familiar_ref(name))
        except InvalidArgument:
            log.info("export: %s is not a docker reference; left out of RepoTags", name)
    return tags


def _plan_docker(exporter: Exporter, request: ExportImages, wanted: list[dict[str, str]], temp_dir: str) -> None:
    """`docker save` layout: <config hex>.json, <diff id hex>/layer.tar, manifest.json, repositories."""
    by_manifest: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name in request.names:
        target = _image_target(exporter.session, name)
        desc = target
        for _ in range(MAX_DEPTH):
            if desc.get("mediaType") not in oci.INDEX_TYPES:
                break
            chosen = _select(exporter, desc, wanted, False, with_blobs=False)
            if not chosen:
                shown = ", ".join("/".join(p.values()) for p in wanted)
                raise NotFound(f"image {name} has no manifest for platform {shown}")
            desc = chosen[0]
        if desc.get("mediaType") not in oci.MANIFEST_TYPES:
            raise InvalidArgument(f"image {name}: no image manifest below its target")
        by_manifest.setdefault(desc["digest"], (desc, []))[1].append(name)
    entries: list[tuple[str, list[str], list[str]]] = []
    repositories: list[tuple[list[str], str]] = []
    for desc, names in by_manifest.values():
        manifest = exporter.document(desc, "manifest")
        config_desc = validate_descriptor(manifest.get("config"), "manifest config")
        config = read_document(exporter.session, config_desc, "image config")
        layers = [validate_descriptor(layer, "manifest layers") for layer in manifest.get("layers") or []]
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(layers):
            raise FailedPrecondition(f"image {names[0]}: {len(layers)} layers but {len(diff_ids)} diff ids")
        config_member = f"{digest_hex(config_desc['digest'])}.json"
        exporter.add_blob(config_desc, config_member)
        members = []
        for layer, diff_id in zip(layers, diff_ids):
            member = f"{digest_hex(diff_id)}/layer.tar"
            members.append(member)
            if member not in exporter.records:
                exporter.add(_uncompressed_layer(exporter, layer, diff_id, member, temp_dir))
        tags = _familiar_names(names)
        entries.append((config_member, members, tags))
        repositories.append((tags, digest_hex(diff_ids[-1]) if diff_ids else ""))
    exporter.add_bytes(docker.MANIFEST_FILE, docker.save_manifest(entries))
    exporter.add_bytes(docker.REPOSITORIES_FILE, docker.save_repositories(repositories))


def _uncompressed_layer(exporter: Exporter, layer: dict[str, Any], diff_id: str, member: str, temp_dir: str) -> Record:
    """A layer as the uncompressed tar docker-archives hold, its diff ID checked.

    Compressed layers are decompressed into a temporary file first: a tar header needs
    the size before the bytes.
    """
    open_blob = exporter.opener(layer)
    with open_blob() as stream:
        head = stream.read(8)
    kind = diff.detect_compression(head) if head else "none"
    if kind == "none":
        return Record(member, layer["size"], lambda: VerifiedReader(open_blob(), diff_id, layer["size"], member))
    fd, path = tempfile.mkstemp(prefix="layer-", dir=temp_dir)
    hasher = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out, open_blob() as stream:
        for chunk in _decompress(stream, kind):
            hasher.update(chunk)
            out.write(chunk)
            size += len(chunk)
    if "sha256:" + hasher.hexdigest() != diff_id:
        raise FailedPrecondition(f"layer {layer['digest']} uncompresses to sha256:{hasher.hexdigest()}, the config says {diff_id}")
    return Record(member, size, lambda: open(path, "rb"))


def _decompress(stream: BinaryIO, kind: str) -> Iterator[bytes]:
    """Chunks of a gzip (every member) or zstd stream, uncompressed."""
    if kind == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        while True:
            chunk = reader.read(_CHUNK)
            if not chunk:
                return
            yield chunk
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while True:
        data = stream.read(_CHUNK)
        if not data:
            break
        while data:
            yield decomp.decompress(data)
            if decomp.eof:
                data = decomp.unused_data
                decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
                if data.strip(b"\0") == b"":
                    data = b""
            else:
                data = b""
    yield decomp.flush()


# -- check and usage ------------------------------------------------------------------------


def _descriptor_model(desc: dict[str, Any]) -> dict[str, Any]:
    return _wire_descriptor(desc)


def check_images(session: Session, request: CheckImages) -> list[CheckedImage]:
    """transfer.check: ctr images check for every image matching the filters."""
    wanted = _platforms([request.platform] if request.platform else [])[0]
    found = session.call("images.list", {"filters": request.filters})["images"]
    return [check_image(session, image, wanted, request.snapshotter) for image in found]


def check_image(session: Session, image: dict[str, Any], wanted: dict[str, str], snapshotter: str) -> CheckedImage:
    """Which of an image's blobs for `wanted` are here, and whether it is unpacked."""
    record = Image.model_validate(image)
    target = image["target"]
    try:
        _desc, manifest = find_manifest(session, target, wanted)
    except NotFound:
        missing = [target]
        return CheckedImage(image=record, available=False, required=missing, present=[], missing=missing)
    except MoordError as exc:
        return CheckedImage(image=record, available=False, error=exc.message)
    try:
        required = [validate_descriptor(manifest.get("config"), "manifest config")]
        required += [validate_descriptor(layer, "manifest layers") for layer in manifest.get("layers") or []]
    except InvalidArgument as exc:
        return CheckedImage(image=record, available=False, error=exc.message)
    present, missing = [], []
    for desc in required:
        try:
            session.call("content.info", {"digest": desc["digest"]})
            present.append(_descriptor_model(desc))
        except NotFound:
            missing.append(_descriptor_model(desc))
    unpacked, error = False, ""
    if not any(m["digest"] == required[0]["digest"] for m in missing):
        try:
            config = read_document(session, required[0], "image config")
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            if diff_ids:
                session.call("snapshots.stat", {"snapshotter": snapshotter, "key": oci.chain_ids(diff_ids)[-1]})
                unpacked = True
        except NotFound:
            pass
        except MoordError as exc:
            error = exc.message
    return CheckedImage(
        image=record, available=True, required=[_descriptor_model(d) for d in required],
        present=present, missing=missing, unpacked=unpacked, error=error,
    )


def image_usage(session: Session, request: ImageUsage) -> UsageReply:
    """transfer.usage: bytes of the image's blobs present here (all platforms, or one), and
    of the snapshots its configs reference (the whole chain, each counted once)."""
    image = session.call("images.get", {"name": request.name})["image"]
    wanted = _platforms([request.platform])[0] if request.platform else None
    totals = {"content": 0, "blobs": 0, "missing": 0}
    snapshot_refs: set[tuple[str, str]] = set()
    seen: set[str] = set()

    def visit(desc: dict[str, Any], depth: int) -> None:
        digest = desc["digest"]
        if digest in seen or depth > MAX_DEPTH:
            return
        seen.add(digest)
        try:
            info = session.call("content.info", {"digest": digest})["info"]
        except NotFound:
            totals["missing"] += 1
            return
        totals["content"] += int(info["size"])
        totals["blobs"] += 1
        for key, value in (info.get("labels") or {}).items():
            if key.startswith(GC_REF_SNAPSHOT + "."):
                snapshot_refs.add((key[len(GC_REF_SNAPSHOT) + 1 :], value))
        media_type = desc.get("mediaType") or desc.get("media_type") or ""
        if media_type in oci.INDEX_TYPES:
            entries = [validate_descriptor(e, "index") for e in read_document(session, desc, "index").get("manifests") or []]
            if wanted is not None:
                ranked = [e for e in entries if _preference(e.get("platform"), [wanted]) is not None]
                entries = sorted(ranked, key=lambda e: _preference(e.get("platform"), [wanted]) or 0)[:1]
            for entry in entries:
                visit(entry, depth + 1)
        elif media_type in oci.MANIFEST_TYPES:
            manifest = read_document(session, desc, "manifest")
            for child in [manifest.get("config"), *(manifest.get("layers") or [])]:
                visit(validate_descriptor(child, "manifest"), depth + 1)

    visit(_oci_descriptor(image["target"]), 0)
    size = inodes = count = 0
    counted: set[tuple[str, str]] = set()
    for snapshotter, key in sorted(snapshot_refs):
        while key and (snapshotter, key) not in counted:
            counted.add((snapshotter, key))
            try:
                info = session.call("snapshots.stat", {"snapshotter": snapshotter, "key": key})["info"]
                used = session.call("snapshots.usage", {"snapshotter": snapshotter, "key": key})
            except (NotFound, InvalidArgument):
                break
            size += int(used.get("size", 0))
            inodes += int(used.get("inodes", 0))
            count += 1
            key = info.get("parent") or ""
    return UsageReply(
        content_size=totals["content"], blobs=totals["blobs"], missing=totals["missing"],
        snapshot_size=size, snapshot_inodes=inodes, snapshots=count,
    )

