"""The overlayfs snapshotter (containerd's snapshots/overlay).

Each snapshot is `snapshots/<id>/fs` (its upper layer) plus `snapshots/<id>/work` when
active. Mounts: without parents a bind of its own fs (rw when active, ro for a view); a
view of exactly one parent a ro bind of that parent's fs; otherwise an overlay whose
lowerdir lists the parents' fs nearest first, with upperdir/workdir when active.
"""

from __future__ import annotations

import os

from moord.actors.snapshotter.backend import Snapshotter
from moord.actors.snapshotter.storage import ACTIVE, VIEW, SnapshotRecord
from moord.messages.errors import InvalidArgument
from moord.messages.types import Mount


def _supports_index_option() -> bool:
    # Kernels with the overlay "index" feature accept index=off; containerd turns it off
    # so that a lower layer may be shared by several overlays.
    return os.path.exists("/sys/module/overlay/parameters/index")


class OverlaySnapshotter(Snapshotter):
    """Snapshots as overlayfs layers."""

    name = "overlayfs"

    def __init__(self, root: str) -> None:
        if any(c in root for c in ",:"):
            # Overlay options are comma separated and lowerdir is colon separated.
            raise InvalidArgument(f"overlayfs root {root!r} must not contain ',' or ':'")
        super().__init__(root)
        self.index_off = _supports_index_option()

    def data_dir(self, snapshot_id: int) -> str:
        """The snapshot's upper layer."""
        return os.path.join(self.snapshot_dir(snapshot_id), "fs")

    def work_dir(self, snapshot_id: int) -> str:
        """The overlay work directory of an active snapshot."""
        return os.path.join(self.snapshot_dir(snapshot_id), "work")

    def populate(self, new_dir: str, kind: str, parent_ids: list[int]) -> None:
        """Create fs (and work when active); fs takes the owner of the parent's fs."""
        upper = os.path.join(new_dir, "fs")
        os.mkdir(upper, 0o755)
        os.chmod(upper, 0o755)  # whatever the umask
        if kind == ACTIVE:
            os.mkdir(os.path.join(new_dir, "work"), 0o711)
        if parent_ids:
            st = os.stat(self.data_dir(parent_ids[0]))
            os.lchown(upper, st.st_uid, st.st_gid)

    def mounts_for(self, record: SnapshotRecord, parent_ids: list[int]) -> list[Mount]:
        """containerd's overlay mounts for this snapshot."""
        if not parent_ids:
            mode = "ro" if record.kind == VIEW else "rw"
            return [Mount(type="bind", source=self.data_dir(record.id), options=[mode, "rbind"])]
        if record.kind == VIEW and len(parent_ids) == 1:
            return [Mount(type="bind", source=self.data_dir(parent_ids[0]), options=["ro", "rbind"])]
        options = ["index=off"] if self.index_off else []
        if record.kind == ACTIVE:
            options += [f"workdir={self.work_dir(record.id)}", f"upperdir={self.data_dir(record.id)}"]
        options.append("lowerdir=" + ":".join(self.data_dir(i) for i in parent_ids))
        return [Mount(type="overlay", source="overlay", options=options)]
