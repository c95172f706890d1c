"""Transfer service (the images process): import, export, unpack, and the image checks
that need the content store (check, usage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moord.messages.base import Message, request
from moord.messages.images import Image
from moord.messages.types import Descriptor

PlatformText = str  # os[/arch[/variant]], e.g. linux/arm64/v8


class ImportReply(Message):
    """Images created or updated by an import, and the archive format found."""

    images: list[Image]
    format: Literal["oci", "docker"] = "oci"


class UnpackReply(Message):
    """The top snapshot's chain id after unpacking."""

    chain_id: str
    layers_applied: int


@request("transfer.import", ImportReply)
class ImportArchive(Message):
    """Import an archive the daemon can read: an OCI image layout (directory or tar) or a
    docker-archive (`docker save` tar); the format is detected."""

    path: str = Field(min_length=1, max_length=4096)
    base_name: str = Field(default="", max_length=4096)
    unpack: bool = True
    snapshotter: str = Field(default="overlayfs", max_length=64)


@request("transfer.unpack", UnpackReply)
class UnpackImage(Message):
    """Unpack an image's layers into committed snapshots (the host's platform by default)."""

    name: str = Field(min_length=1, max_length=4096)
    snapshotter: str = Field(default="overlayfs", max_length=64)
    platform: PlatformText = Field(default="", max_length=128)


class ExportReply(Message):
    """What an export wrote."""

    path: str
    format: Literal["oci", "docker"]
    images: list[str]
    blobs: int
    size: int


@request("transfer.export", ExportReply)
class ExportImages(Message):
    """Export images to an archive the daemon writes at an absolute path.

    format "oci": an OCI image layout (a tar, or a directory with `directory`), with
    containerd's Docker-compatible manifest.json in a tar unless `skip_manifest_json`;
    format "docker": a `docker save` tar (uncompressed layers, one platform per image).
    Platforms: the host's unless `platforms` names some (in order of preference); with
    `all_platforms` every manifest of an index, whose content must then be present.
    """

    names: list[str] = Field(min_length=1, max_length=1000)
    path: str = Field(min_length=1, max_length=4096)
    format: Literal["oci", "docker"] = "oci"
    directory: bool = False
    overwrite: bool = False
    platforms: list[PlatformText] = Field(default_factory=list, max_length=32)
    all_platforms: bool = False
    skip_manifest_json: bool = False


class CheckedImage(Message):
    """ctr images check for one image: which blobs its platform needs, has and lacks."""

    image: Image
    available: bool
    required: list[Descriptor] = Field(default_factory=list)
    present: list[Descriptor] = Field(default_factory=list)
    missing: list[Descriptor] = Field(default_factory=list)
    unpacked: bool = False
    error: str = ""


class CheckReply(Message):
    """Every checked image."""

    images: list[CheckedImage]


@request("transfer.check", CheckReply)
class CheckImages(Message):
    """Check the images matching any filter (all when none) for a platform (the host's)."""

    filters: list[str] = Field(default_factory=list)
    snapshotter: str = Field(default="overlayfs", max_length=64)
    platform: PlatformText = Field(default="", max_length=128)


class UsageReply(Message):
    """Bytes an image holds: its blobs present here, and its unpacked snapshots."""

    content_size: int
    blobs: int
    missing: int
    snapshot_size: int
    snapshot_inodes: int
    snapshots: int


@request("transfer.usage", UsageReply)
class ImageUsage(Message):
    """Usage of one image: every platform's blobs, or one platform's (`platform`)."""

    name: str = Field(min_length=1, max_length=4096)
    platform: PlatformText = Field(default="", max_length=128)
    snapshots: bool = True
