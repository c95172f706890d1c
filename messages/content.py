"""Content service (containerd api/services/content/v1).

Writes are one request per chunk: `content.write` with action stat, write or commit;
the chunk travels as the request's extra frame. Reads answer with the bytes as an extra
frame of the reply.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moord.messages.base import Digest, Empty, Labels, Message, request

# One chunk of a read or write; the client splits larger transfers.
MAX_CHUNK_BYTES = 4 * 1024 * 1024


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
    """One step of a write by ref: stat, write (chunk in the extra frame) or commit."""

    action: Literal["stat", "write", "commit"]
    ref: Ref = Field(min_length=1, max_length=512)
    offset: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)
    expected: str = ""
    labels: Labels = Field(default_factory=dict)


@request("content.abort", Empty)
class ContentAbort(Message):
    """Abandon an ingest."""

    ref: Ref = Field(min_length=1, max_length=512)
