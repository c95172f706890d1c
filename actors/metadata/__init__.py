"""moord.actors.metadata: namespaces, images, containers and content ownership in SQLite."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moord.supervisor.process import ProcessContext


def start(proc: ProcessContext) -> None:
    """Open `<root>/io.containerd.metadata.v1.sqlite/meta.db` and serve the metadata kinds."""
    from moord.actors.metadata.actor import MetadataActor
    from moord.actors.metadata.schema import db_path_for

    proc.serve(MetadataActor, db_path_for(proc.config.root), proc.events)
