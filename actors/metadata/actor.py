"""The metadata actor: one thread, one SQLite connection, every metadata service."""

from __future__ import annotations

import pykka

from moord.actors.base import ServiceActor
from moord.actors.metadata.containers import ContainersService
from moord.actors.metadata.contentmeta import ContentOwnershipService
from moord.actors.metadata.images import ImagesService
from moord.actors.metadata.leases import LeasesService
from moord.actors.metadata.namespaces import NamespacesService
from moord.actors.metadata.schema import Database
from moord.bus.client import Client
from moord.bus.events import EventPublisher


class MetadataActor(
    NamespacesService, ImagesService, ContainersService, LeasesService, ContentOwnershipService, ServiceActor
):
    """Serves namespaces.*, images.*, containers.*, leases.* and contentmeta.* from one database.

    One actor owns the connection, so requests are serialised: each is one short
    transaction, and writes take SQLite's write lock up front.
    """

    def __init__(
        self,
        db_path: str,
        events: EventPublisher | None = None,
        gc: pykka.ActorRef | None = None,
        client: Client | None = None,
    ) -> None:
        super().__init__()
        self.gc = gc  # the GC actor: told of every write, runs leases.delete's sync collection
        self.client = client  # to ask the snapshotter process what a namespace still holds
        # Opened (and migrated) here, in the starting thread, so that a broken database
        # fails start() itself; afterwards only the actor's thread uses the connection.
        self.db = Database(db_path)
        self.events = events

    def on_stop(self) -> None:
        """Close the database."""
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
