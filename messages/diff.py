"""Diff service (containerd api/services/diff/v1): apply a layer onto mounts, or make one
from the difference between two sets of mounts.

`diff.apply` reads the layer from the content store of the caller's namespace and
answers the descriptor of the uncompressed tar (its digest is the diff ID).
`diff.diff` writes the layer into the content store and answers its descriptor; the
blob carries `containerd.io/uncompressed=<diff ID>`.
"""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Labels, Message, request
from moord.messages.types import Descriptor, Mount

# More mounts than any snapshotter returns for one snapshot.
MAX_MOUNTS = 16


class Payload(Message):
    """A stream processor's payload (protobuf Any): its type URL and encoded value."""

    type_url: str = Field(max_length=1024)
    value: bytes = Field(default=b"", max_length=1024 * 1024)


class ApplyReply(Message):
    """The applied content: the uncompressed layer (digest = diff ID, size in bytes)."""

    applied: Descriptor


class DiffReply(Message):
    """The layer written into the content store."""

    diff: Descriptor


@request("diff.apply", ApplyReply)
class ApplyDiff(Message):
    """Apply the layer blob `diff` (tar, tar+gzip or tar+zstd) onto `mounts`."""

    diff: Descriptor
    mounts: list[Mount] = Field(min_length=1, max_length=MAX_MOUNTS)
    payloads: dict[str, Payload] = Field(default_factory=dict, max_length=16)


@request("diff.diff", DiffReply)
class MakeDiff(Message):
    """Write the changes from `left` (older; none = empty) to `right` (newer) as a layer.

    media_type: the OCI layer tar or tar+gzip ("" = tar+gzip). ref: the content store
    ingest ref ("" = a fresh one). labels: set on the blob at commit.
    """

    left: list[Mount] = Field(default_factory=list, max_length=MAX_MOUNTS)
    right: list[Mount] = Field(min_length=1, max_length=MAX_MOUNTS)
    media_type: str = Field(default="", max_length=255)
    ref: str = Field(default="", max_length=512)
    labels: Labels = Field(default_factory=dict)
