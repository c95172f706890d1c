"""Transfer service (the images process): import into content and unpack into snapshots."""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Message, request
from moord.messages.images import Image


class ImportReply(Message):
    """Images created or updated by an import."""

    images: list[Image]


class UnpackReply(Message):
    """The top snapshot's chain id after unpacking."""

    chain_id: str
    layers_applied: int


@request("transfer.import", ImportReply)
class ImportArchive(Message):
    """Import an OCI image layout (directory or tar) that the daemon can read."""

    path: str = Field(min_length=1, max_length=4096)
    base_name: str = Field(default="", max_length=4096)
    unpack: bool = True
    snapshotter: str = Field(default="overlayfs", max_length=64)


@request("transfer.unpack", UnpackReply)
class UnpackImage(Message):
    """Unpack an image's layers into committed snapshots."""

    name: str = Field(min_length=1, max_length=4096)
    snapshotter: str = Field(default="overlayfs", max_length=64)
