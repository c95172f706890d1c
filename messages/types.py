"""Value types shared by several services (containerd's api/types)."""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Digest, Message


class Descriptor(Message):
    """An OCI content descriptor."""

    media_type: str = Field(max_length=255)
    digest: Digest
    size: int = Field(ge=0)
    annotations: dict[str, str] = Field(default_factory=dict)


class Mount(Message):
    """A mount as a snapshotter returns it and a runtime performs it."""

    type: str = Field(max_length=64)
    source: str = Field(max_length=4096)
    target: str = Field(default="", max_length=4096)
    options: list[str] = Field(default_factory=list)


class Platform(Message):
    """An OCI platform (os/architecture/variant)."""

    os: str
    architecture: str
    variant: str = ""
