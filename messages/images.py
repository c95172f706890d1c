"""Images service (containerd api/services/images/v1): image records in metadata."""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Empty, Labels, Message, request
from moord.messages.types import Descriptor


class Image(Message):
    """A named reference to a root descriptor (index or manifest)."""

    name: str = Field(min_length=1, max_length=4096)
    labels: Labels = Field(default_factory=dict)
    target: Descriptor
    created_at: float = 0.0
    updated_at: float = 0.0


class ImageReply(Message):
    """One image."""

    image: Image


class ImageList(Message):
    """Several images."""

    images: list[Image]


@request("images.get", ImageReply)
class GetImage(Message):
    """Get an image by name."""

    name: str = Field(min_length=1, max_length=4096)


@request("images.list", ImageList)
class ListImages(Message):
    """List images matching any filter."""

    filters: list[str] = Field(default_factory=list)


@request("images.create", ImageReply)
class CreateImage(Message):
    """Create an image record."""

    image: Image


@request("images.update", ImageReply)
class UpdateImage(Message):
    """Update an image (update_mask: labels, labels.<key>, target)."""

    image: Image
    update_mask: list[str] = Field(default_factory=list)


@request("images.delete", Empty)
class DeleteImage(Message):
    """Delete an image record."""

    name: str = Field(min_length=1, max_length=4096)
    sync: bool = False
