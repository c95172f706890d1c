"""OCI image-spec facts: media types, platform matching, chain IDs. Stdlib only."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from typing import Any

MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
# Index and manifest documents larger than this are refused (as containerd does).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "i686": "386", "riscv64": "riscv64"}


def host_platform() -> dict[str, str]:
    """The platform this host runs natively, in OCI terms."""
    machine = _platform.machine().lower()
    result = {"os": "linux", "architecture": _ARCH.get(machine, machine)}
    if machine == "armv7l":
        result["variant"] = "v7"
    elif machine in ("aarch64", "arm64"):
        result["variant"] = "v8"
    return result


def platform_matches(candidate: dict[str, Any] | None, wanted: dict[str, str]) -> bool:
    """Whether an index entry's platform runs on `wanted` (a missing variant matches)."""
    if not candidate:
        return False
    if candidate.get("os") != wanted["os"] or candidate.get("architecture") != wanted["architecture"]:
        return False
    variant = candidate.get("variant") or ""
    return not variant or not wanted.get("variant") or variant == wanted["variant"]


def parse_platform(text: str) -> dict[str, str]:
    """`linux/arm64/v8` -> {"os", "architecture", "variant"}; ValueError if malformed."""
    parts = text.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ValueError(f"invalid platform {text!r}: want os[/arch[/variant]]")
    host = host_platform()
    result = {"os": parts[0], "architecture": parts[1] if len(parts) > 1 else host["architecture"]}
    if len(parts) == 3:
        result["variant"] = parts[2]
    return result


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID of each layer prefix: ChainID(L0) = DiffID(L0); then sha256("<prev> <diffid>")."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


def load_document(data: bytes, what: str) -> dict[str, Any]:
    """Parse an index, manifest or config; ValueError when oversized or not a JSON object."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{what} of {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is not a JSON object")
    return doc
