"""Snapshots service (containerd api/services/snapshots/v1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moord.messages.base import Empty, Labels, Message, request
from moord.messages.types import Mount

SnapshotKey = str
KEY_MAX = 4096


class SnapshotInfo(Message):
    """A snapshot as its namespace sees it."""

    name: str
    parent: str = ""
    kind: Literal["active", "view", "committed"]
    created_at: float = 0.0
    updated_at: float = 0.0
    labels: Labels = Field(default_factory=dict)


class MountsReply(Message):
    """Mounts that make the snapshot's filesystem."""

    mounts: list[Mount]


class SnapshotReply(Message):
    """One snapshot's info."""

    info: SnapshotInfo


class SnapshotList(Message):
    """Several snapshots' info."""

    info: list[SnapshotInfo]


class UsageReply(Message):
    """Disk used by a snapshot itself (parents excluded)."""

    size: int
    inodes: int


class _Keyed(Message):
    snapshotter: str = Field(default="overlayfs", max_length=64)
    key: SnapshotKey = Field(min_length=1, max_length=KEY_MAX)


@request("snapshots.prepare", MountsReply)
class PrepareSnapshot(_Keyed):
    """Create an active snapshot on a committed parent (or none)."""

    parent: SnapshotKey = Field(default="", max_length=KEY_MAX)
    labels: Labels = Field(default_factory=dict)


@request("snapshots.view", MountsReply)
class ViewSnapshot(_Keyed):
    """Create a read-only view of a committed parent."""

    parent: SnapshotKey = Field(default="", max_length=KEY_MAX)
    labels: Labels = Field(default_factory=dict)


@request("snapshots.mounts", MountsReply)
class SnapshotMounts(_Keyed):
    """Mounts of an active snapshot or view."""


@request("snapshots.commit", Empty)
class CommitSnapshot(Message):
    """Turn active snapshot `key` into committed snapshot `name`."""

    snapshotter: str = Field(default="overlayfs", max_length=64)
    name: SnapshotKey = Field(min_length=1, max_length=KEY_MAX)
    key: SnapshotKey = Field(min_length=1, max_length=KEY_MAX)
    labels: Labels = Field(default_factory=dict)


@request("snapshots.remove", Empty)
class RemoveSnapshot(_Keyed):
    """Remove a snapshot without children."""


@request("snapshots.stat", SnapshotReply)
class StatSnapshot(_Keyed):
    """Info of one snapshot."""


@request("snapshots.update", SnapshotReply)
class UpdateSnapshot(Message):
    """Update a snapshot's labels."""

    snapshotter: str = Field(default="overlayfs", max_length=64)
    info: SnapshotInfo
    update_mask: list[str] = Field(default_factory=list)


@request("snapshots.list", SnapshotList)
class ListSnapshots(Message):
    """List snapshots of this namespace matching any filter."""

    snapshotter: str = Field(default="overlayfs", max_length=64)
    filters: list[str] = Field(default_factory=list)


@request("snapshots.usage", UsageReply)
class SnapshotUsage(_Keyed):
    """Disk usage of one snapshot."""


@request("snapshots.cleanup", Empty)
class CleanupSnapshots(Message):
    """Remove on-disk leftovers no record refers to."""

    snapshotter: str = Field(default="overlayfs", max_length=64)
