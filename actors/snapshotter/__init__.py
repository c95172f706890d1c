"""moord.actors.snapshotter: the overlayfs and native snapshotters behind snapshots.*.

`start(proc)` serves one SnapshotterActor (with lease and GC support) for both, rooted at `<config.root>`:
`io.containerd.snapshotter.v1.overlayfs/` and `io.containerd.snapshotter.v1.native/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moord.supervisor.process import ProcessContext


def start(proc: "ProcessContext") -> None:
    """Start the snapshotter actor in this process and route snapshots.* to it."""
    from moord.actors.snapshotter.gc_support import LeasedSnapshotterActor

    proc.serve(LeasedSnapshotterActor, proc.config.root, proc.events, proc.client)
