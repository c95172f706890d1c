"""Client-side reading of an image: its manifest for this platform, config, chain IDs."""

from __future__ import annotations

from typing import Any, NamedTuple

from moord.bus.client import Client
from moord.messages.errors import FailedPrecondition, NotFound
from moord.oci import image as oci


class ResolvedImage(NamedTuple):
    """What running a container needs from an image."""

    name: str
    target: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    chain_id: str


def read_blob(client: Client, digest: str, limit: int = oci.MAX_MANIFEST_BYTES) -> bytes:
    """Read a whole (small) blob through content.read."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        reply, frames = client.call_frames("content.read", {"digest": digest, "offset": offset})
        data = bytes(frames[0]) if frames else b""
        chunks.append(data)
        offset += len(data)
        if offset > limit:
            raise FailedPrecondition(f"blob {digest} exceeds {limit} bytes")
        if not data or offset >= reply.get("size", 0):
            return b"".join(chunks)


def resolve(client: Client, name: str, platform: dict[str, str] | None = None) -> ResolvedImage:
    """Find the image, pick the manifest for the platform, and read its config."""
    image = client.call("images.get", {"name": name})["image"]
    wanted = platform or oci.host_platform()
    desc = image["target"]
    for _ in range(4):  # an index may point at an index; stop at a sane depth
        if desc["media_type"] not in oci.INDEX_TYPES:
            break
        index = oci.load_document(read_blob(client, desc["digest"]), "index")
        matches = [m for m in index.get("manifests", []) if oci.platform_matches(m.get("platform"), wanted)]
        if not matches:
            raise NotFound(f"image {name} has no manifest for platform {wanted['os']}/{wanted['architecture']}")
        desc = {"media_type": matches[0].get("mediaType", ""), "digest": matches[0]["digest"]}
    manifest = oci.load_document(read_blob(client, desc["digest"]), "manifest")
    config = oci.load_document(read_blob(client, manifest["config"]["digest"]), "image config")
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if not diff_ids:
        raise FailedPrecondition(f"image {name} has no layers")
    return ResolvedImage(name, image["target"], manifest, config, oci.chain_ids(diff_ids)[-1])
