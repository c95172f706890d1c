"""docker-archive (`docker save`) images: read manifest.json, build schema 2 manifests, write one.

A docker-archive is a tar holding `manifest.json` (a list of {Config, RepoTags, Layers}
naming files of the archive), a `<id>.json` image config per image and one tar per
layer (uncompressed from `docker save`, possibly compressed from other tools, possibly a
symlink to another image's identical layer), plus a legacy `repositories` file.

Nothing in the archive names a digest: every blob's digest is computed from its bytes,
so a lying archive can at worst describe an image whose diff IDs do not match its
layers, which the unpack refuses. As containerd's importer does, each entry becomes a
Docker schema 2 manifest whose layer media types follow each layer's compression, and
each RepoTag is normalised (`busybox:1` -> `docker.io/library/busybox:1`).

Imports only the standard library and moord's stdlib-only modules (errors, the registry
client's reference parser).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from moord.oci.reference import DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX, parse_reference
from moord.messages.errors import InvalidArgument
from moord.oci import image as oci
from moord.oci.layout import ArchiveFiles

MANIFEST_FILE = "manifest.json"
REPOSITORIES_FILE = "repositories"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
# manifest.json lists every image of the archive; it is small unless hostile.
MAX_ARCHIVE_MANIFEST_BYTES = oci.MAX_MANIFEST_BYTES
# -- references (parsed by the registry client's one parser) ----------------------------


def normalize_ref(text: str) -> str:
    """A RepoTag as an image name, as containerd's importer names it (docker.io/library/x:latest).

    A reference with a digest keeps only the digest; one with neither gets `:latest`.
    """
    ref = parse_reference(text)
    if ref.digest:
        return f"{ref.name}@{ref.digest}"
    return str(ref)


def familiar_ref(text: str) -> str:
    """An image name as docker shows it in RepoTags (`busybox:latest`, `user/app:1`)."""
    ref = parse_reference(text, default_tag=False)
    path = ref.repository
    if ref.host == DEFAULT_DOMAIN:
        short = path.startswith(OFFICIAL_REPO_PREFIX) and path.count("/") == 1
        name = path[len(OFFICIAL_REPO_PREFIX) :] if short else path
    else:
        name = ref.name
    if ref.digest and not ref.tag:
        return f"{name}@{ref.digest}"
    return f"{name}:{ref.tag or 'latest'}"


def oci_ref_name(name: str) -> str:
    """The `org.opencontainers.image.ref.name` containerd writes for an image name: its tag
    (or `@digest`), or the whole name when it has no repository part."""
    if "/" not in name:
        return name
    path = name.split("/", 1)[1]
    match = re.search(r"[:@]", path)
    if not match:
        return ""
    obj = path[match.start() :]
    return obj[1:] if obj.startswith(":") else obj


# -- reading -------------------------------------------------------------------------------


@dataclass
class ArchiveEntry:
    """One image of a docker-archive's manifest.json: member names and tags."""

    config: str
    layers: list[str]
    repo_tags: list[str] = field(default_factory=list)


def _member(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise InvalidArgument(f"{MANIFEST_FILE}: {what} is not a file name")
    return value


def read_entries(files: ArchiveFiles) -> list[ArchiveEntry]:
    """Parse and check manifest.json: every named config and layer must be in the archive."""
    data = files.read_small(MANIFEST_FILE, MAX_ARCHIVE_MANIFEST_BYTES)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{files.path}: {MANIFEST_FILE} is not valid JSON: {exc}") from None
    if not isinstance(doc, list) or not doc:
        raise InvalidArgument(f"{files.path}: {MANIFEST_FILE} is not a non-empty list of images")
    entries: list[ArchiveEntry] = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise InvalidArgument(f"{files.path}: {MANIFEST_FILE}[{i}] is not an object")
        config = _member(item.get("Config"), f"[{i}].Config")
        layers = item.get("Layers")
        if not isinstance(layers, list) or not layers:
            raise InvalidArgument(f"{files.path}: {MANIFEST_FILE}[{i}].Layers is not a non-empty list")
        layers = [_member(layer, f"[{i}].Layers") for layer in layers]
        tags = item.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidArgument(f"{files.path}: {MANIFEST_FILE}[{i}].RepoTags is not a list of names")
        for name in [config, *layers]:
            if not files.exists(name):
                raise InvalidArgument(f"{files.path}: {MANIFEST_FILE}[{i}] names {name[:200]!r}, which the archive lacks")
        entries.append(ArchiveEntry(config, layers, [normalize_ref(t) for t in tags]))
    return entries


def layer_media_type(head: bytes) -> str:
    """The schema 2 media type of a layer from its first bytes (as containerd's importer)."""
    if head[:3] == b"\x1f\x8b\x08":
        return oci.MEDIA_TYPE_DOCKER_LAYER_GZIP
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return oci.MEDIA_TYPE_OCI_LAYER_ZSTD  # docker has no zstd type; this is the one that says it
    return MEDIA_TYPE_DOCKER_LAYER


def config_platform(config: dict[str, Any]) -> dict[str, str] | None:
    """The platform an image config declares (os, architecture, variant), or None."""
    os_name, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    platform = {"architecture": arch, "os": os_name}
    variant = config.get("variant")
    if isinstance(variant, str) and variant:
        platform["variant"] = variant
    return platform


def go_json(doc: Any) -> bytes:
    """JSON as Go's encoding/json writes it (key order as given, no spaces, HTML escaped):
    the same archive converts to the same manifest digest as containerd's."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    """An OCI descriptor with its fields in the image-spec's (and Go's) order."""
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    desc.update({k: v for k, v in extra.items() if v})
    return desc


def schema2_manifest(config: dict[str, Any], layers: list[dict[str, Any]]) -> bytes:
    """A Docker schema 2 manifest naming a config and layers (descriptors)."""
    return go_json(
        {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_DOCKER_MANIFEST, "config": config, "layers": layers}
    )


# -- writing ---------------------------------------------------------------------------------


def save_manifest(images: list[tuple[str, list[str], list[str]]]) -> bytes:
    """manifest.json of a `docker save` archive from (config member, layer members, RepoTags)."""
    return go_json([{"Config": c, "RepoTags": tags or None, "Layers": layers} for c, layers, tags in images])


def save_repositories(images: list[tuple[list[str], str]]) -> bytes:
    """The legacy `repositories` file: {repository: {tag: top layer id}} from (RepoTags, top id)."""
    repos: dict[str, dict[str, str]] = {}
    for tags, top in images:
        for tag in tags:
            if "@" in tag:
                continue
            repo, _, name = tag.rpartition(":")
            repos.setdefault(repo, {})[name] = top
    return go_json(repos)
