"""moord.actors.metadata: namespaces, images, containers, leases and content ownership in
SQLite, and the GC actor collecting over them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moord.supervisor.process import ProcessContext


def start(proc: ProcessContext) -> None:
    """Open `<root>/io.containerd.metadata.v1.sqlite/meta.db`; serve the metadata and gc kinds."""
    from moord.actors.gc import GcActor
    from moord.actors.metadata.actor import MetadataActor
    from moord.actors.metadata.schema import db_path_for

    db_path = db_path_for(proc.config.root)
    # Each actor has its own connection; the collector's write transaction is the pause.
    collector = proc.serve(GcActor, db_path, proc.client, proc.config.plugins.gc)
    proc.serve(MetadataActor, db_path, proc.events, collector, proc.client)
