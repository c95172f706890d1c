"""Pull and push (the images process): images between registries and the local stores.

A pull is one long request; its progress is published as events on PROGRESS_TOPIC,
one per descriptor state change (and at most every PROGRESS_INTERVAL seconds while
bytes move), so a client can draw bars without polling the content store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moord.messages.base import Message, request
from moord.messages.images import Image

PROGRESS_TOPIC = "/images/progress"
PROGRESS_INTERVAL = 0.1

ProgressStatus = Literal[
    "resolving", "resolved", "waiting", "downloading", "downloaded", "exists",
    "unpacking", "unpacked", "pushing", "pushed", "failed",
]


class TransferProgress(Message):
    """The state of one descriptor within a pull or push (topic PROGRESS_TOPIC)."""

    operation: str = Field(max_length=64, description="the id the client gave the pull or push")
    ref: str = Field(max_length=4096)
    digest: str = Field(max_length=80)
    media_type: str = Field(default="", max_length=255)
    status: ProgressStatus
    offset: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)
    error: str = Field(default="", max_length=4096)


class PullReply(Message):
    """The image a pull created or updated, and what it moved."""

    image: Image
    chain_ids: dict[str, str] = Field(default_factory=dict, description="platform -> top snapshot")
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    layers_unpacked: int = 0


@request("transfer.pull", PullReply)
class PullImage(Message):
    """Pull an image by reference from its registry (or a configured mirror) and unpack it."""

    ref: str = Field(min_length=1, max_length=4096)
    platforms: list[str] = Field(default_factory=list, max_length=32, description="os/arch[/variant]; empty: the host's")
    all_platforms: bool = False
    unpack: bool = True
    snapshotter: str = Field(default="overlayfs", max_length=64)
    operation: str = Field(default="", max_length=64, description="id carried by progress events")


class PushReply(Message):
    """What a push moved."""

    digest: str
    blobs_pushed: int = 0
    bytes_pushed: int = 0


@request("transfer.push", PushReply)
class PushImage(Message):
    """Push a local image to a registry reference (its own name when `ref` is empty)."""

    name: str = Field(min_length=1, max_length=4096)
    ref: str = Field(default="", max_length=4096)
    platforms: list[str] = Field(default_factory=list, max_length=32)
    all_platforms: bool = True
    chunk_size: int = Field(default=0, ge=0, le=64 * 1024 * 1024, description="0: monolithic uploads")
    operation: str = Field(default="", max_length=64)
