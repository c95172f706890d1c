"""What a subsystem process gets when it starts, and the table of subsystem processes.

Each subsystem module exposes `start(proc: ProcessContext) -> None`, which starts its
actors with `proc.serve(...)`. The child entry point builds the context, calls it,
binds the bridge and reports readiness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pykka

from moord.actors.base import ServiceActor
from moord.bus.bridge import Bridge
from moord.bus.client import Client
from moord.bus.events import EventPublisher
from moord.config.model import Config

# process name -> module whose start(proc) builds its actors, in start order.
PROCESSES: dict[str, str] = {
    "events": "moord.actors.events",
    "metadata": "moord.actors.metadata",
    "content": "moord.actors.content",
    "snapshotter": "moord.actors.snapshotter",
    "images": "moord.actors.images",
    "runtime": "moord.actors.runtime",
}


@dataclass
class ProcessContext:
    """A subsystem process's config, bridge, client to its peers, and event publisher."""

    name: str
    config: Config
    bridge: Bridge
    client: Client
    events: EventPublisher
    actors: list[pykka.ActorRef] = field(default_factory=list)
    # Non-actor parts a subsystem keeps alive for the process's lifetime (sockets, threads).
    resources: list[Any] = field(default_factory=list)

    def serve(self, actor_class: type[ServiceActor], *args: Any, **kwargs: Any) -> pykka.ActorRef:
        """Start an actor and route the kinds it handles to it through the bridge."""
        ref = actor_class.start(*args, **kwargs)
        self.actors.append(ref)
        self.bridge.serve(ref, actor_class.kinds())
        return ref
