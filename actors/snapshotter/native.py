"""The native snapshotter (containerd's snapshots/native): plain directory copies.

Prepare copies the parent's whole tree into the new snapshot's directory; one bind
mount makes its filesystem. A view of a parent has no directory of its own: it is a
read-only bind of the parent's.
"""

from __future__ import annotations

import os

from moord.actors.snapshotter import fsutil
from moord.actors.snapshotter.backend import Snapshotter
from moord.actors.snapshotter.storage import ACTIVE, VIEW, SnapshotRecord
from moord.messages.types import Mount


class NativeSnapshotter(Snapshotter):
    """Snapshots as full directory copies."""

    name = "native"

    def data_dir(self, snapshot_id: int) -> str:
        """The snapshot's directory is its filesystem."""
        return self.snapshot_dir(snapshot_id)

    def needs_dir(self, kind: str, parent_ids: list[int]) -> bool:
        """Active snapshots and parentless views own a directory; views of a parent do not."""
        return kind == ACTIVE or not parent_ids

    def populate(self, new_dir: str, kind: str, parent_ids: list[int]) -> None:
        """Copy the parent's tree (owners, modes, xattrs, links, devices) or start empty."""
        os.chmod(new_dir, 0o755)
        if parent_ids:
            fsutil.copy_tree(self.data_dir(parent_ids[0]), new_dir)

    def mounts_for(self, record: SnapshotRecord, parent_ids: list[int]) -> list[Mount]:
        """One bind mount: rw of its own directory, or ro for a view."""
        if record.kind == ACTIVE or not parent_ids:
            source = self.data_dir(record.id)
        else:
            source = self.data_dir(parent_ids[0])
        mode = "ro" if record.kind == VIEW else "rw"
        return [Mount(type="bind", source=source, options=["rbind", mode])]
