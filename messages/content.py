"""Content service (containerd api/services/content/v1), and content ownership.

Writes are one request per chunk: `content.write` with action stat, write or commit;
the chunk travels as the request's extra frame. A `writer` token names the write
session (one gRPC Write stream): the session that first touches a ref holds its lock
until it commits, aborts, closes (action "close") or goes quiet for
INGEST_LOCK_STALE_SECONDS; other sessions get Unavailable "ref <ref> locked".
Reads answer with the bytes as an extra frame of the reply.

`contentmeta.*` are internal kinds: the content process records which namespace owns
which blob in the metadata process (blobs are shared on disk, visible per namespace).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moord.messages.base import Digest, Empty, Labels, Message, request

# One chunk of a read or write; the client splits larger transfers.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# A write session that sent nothing for this long loses its lock on the ref.
INGEST_LOCK_STALE_SECONDS = 30.0
WRITER_MAX_LENGTH = 128


class ContentInfo(Message):
    """A committed blob as seen from one namespace."""

    digest: Digest
    size: int
    created_at: float = 0.0
    updated_at: float = 0.0
    labels: Labels = Field(default_factory=dict)


class InfoReply(Message):
    """One blob's info."""

    info: ContentInfo


class InfoList(Message):
    """Several blobs' info."""

    infos: list[ContentInfo]


class IngestStatus(Message):
    """An ingest (an unfinished write) by ref."""

    ref: str
    offset: int = 0
    total: int = 0
    expected: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0


class StatusReply(Message):
    """One ingest's status."""

    status: IngestStatus


class StatusList(Message):
    """Several ingests' status."""

    statuses: list[IngestStatus]


class WriteReply(Message):
    """State of an ingest after a write action."""

    action: str
    offset: int = 0
    total: int = 0
    digest: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0


class ReadReply(Message):
    """Where the bytes in the reply's extra frame start; `size` of the whole blob."""

    offset: int
    size: int


Ref = str


@request("content.info", InfoReply)
class ContentInfoRequest(Message):
    """Info of a blob this namespace owns."""

    digest: Digest


@request("content.update", InfoReply)
class ContentUpdate(Message):
    """Update a blob's labels (update_mask: `labels` or `labels.<key>`)."""

    info: ContentInfo
    update_mask: list[str] = Field(default_factory=list)


@request("content.list", InfoList)
class ContentList(Message):
    """List blobs of this namespace matching any filter."""

    filters: list[str] = Field(default_factory=list)


@request("content.delete", Empty)
class ContentDelete(Message):
    """Remove a blob from this namespace."""

    digest: Digest


@request("content.read", ReadReply)
class ContentRead(Message):
    """Read up to `size` bytes at `offset` (size 0: to the end, capped at one chunk)."""

    digest: Digest
    offset: int = Field(default=0, ge=0)
    size: int = Field(default=0, ge=0)


@request("content.status", StatusReply)
class ContentStatus(Message):
    """Status of one ingest."""

    ref: Ref = Field(min_length=1, max_length=512)


@request("content.list_statuses", StatusList)
class ContentListStatuses(Message):
    """Status of ingests matching any filter (`ref~=...`)."""

    filters: list[str] = Field(default_factory=list)


@request("content.write", WriteReply)
class ContentWrite(Message):
    """One step of a write by ref: stat, write (chunk in the extra frame), commit or close.

    `writer` is the session token (e.g. one per gRPC stream); "" is an anonymous
    one-request session that never holds the lock. "close" ends the session and
    releases the lock, keeping the ingest for a later resume. Offset 0 on a write
    restarts the ingest from scratch (containerd's truncate).
    """

    action: Literal["stat", "write", "commit", "close"]
    ref: Ref = Field(min_length=1, max_length=512)
    offset: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)
    expected: Digest | Literal[""] = ""
    labels: Labels = Field(default_factory=dict)
    writer: str = Field(default="", max_length=WRITER_MAX_LENGTH)


@request("content.abort", Empty)
class ContentAbort(Message):
    """Abandon an ingest."""

    ref: Ref = Field(min_length=1, max_length=512)


# -- ownership records in the metadata process (content process -> metadata) -----------


class AddOwnershipReply(Message):
    """The namespace's record of the blob, and whether this call created it."""

    info: ContentInfo
    created: bool


class OwnershipDeleteReply(Message):
    """Whether some namespace still owns the blob after this namespace let go of it."""

    still_owned: bool


class OwnershipReply(Message):
    """Whether this namespace owns the blob (`size` then set), and whether any does."""

    owned: bool
    size: int = 0
    owned_anywhere: bool = False


@request("contentmeta.add", AddOwnershipReply)
class AddOwnership(Message):
    """Record that this namespace owns a committed blob (refreshes an existing record:
    updated_at, and `labels` merged over the old ones)."""

    digest: Digest
    size: int = Field(ge=0)
    labels: Labels = Field(default_factory=dict)


@request("contentmeta.info", InfoReply)
class OwnershipInfo(Message):
    """This namespace's record of a blob (NotFound if it does not own it)."""

    digest: Digest


@request("contentmeta.update", InfoReply)
class OwnershipUpdate(ContentUpdate):
    """content.update, applied to the namespace's record."""


@request("contentmeta.list", InfoList)
class OwnershipList(ContentList):
    """content.list, answered from the namespace's records."""


@request("contentmeta.delete", OwnershipDeleteReply)
class OwnershipDelete(Message):
    """Drop this namespace's ownership of a blob (NotFound if it does not own it)."""

    digest: Digest


@request("contentmeta.check", OwnershipReply)
class OwnershipCheck(Message):
    """Whether this namespace owns a blob (before reads and writes). `hold`: a writer found
    it, and the request's lease (if any) now holds it, as containerd leases existing content."""

    digest: Digest
    hold: bool = False
