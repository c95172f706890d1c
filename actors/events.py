"""The events exchange: XSUB from publishers, XPUB to subscribers, and events.publish.

The forwarder runs in its own thread (zmq.proxy); the actor serves `events.publish` for
scripts that speak request/reply rather than PUB.
"""

from __future__ import annotations

import logging
import os
import threading

import zmq

from moord.actors.base import CallContext, ServiceActor, handles
from moord.bus.events import EventPublisher, events_in_path, events_out_path
from moord.messages.base import Empty
from moord.messages.events import PublishEvent
from moord.supervisor.process import ProcessContext

log = logging.getLogger(__name__)


class EventsExchange:
    """Forwards every published event to every subscriber (topic filtering is ZeroMQ's)."""

    def __init__(self, ipc_dir: str, context: zmq.Context | None = None) -> None:
        self._context = context or zmq.Context.instance()
        self._inbound = self._context.socket(zmq.XSUB)
        self._outbound = self._context.socket(zmq.XPUB)
        for sock in (self._inbound, self._outbound):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100000)
            sock.setsockopt(zmq.SNDHWM, 100000)
        old = os.umask(0o177)
        try:
            self._inbound.bind(f"ipc://{events_in_path(ipc_dir)}")
            self._outbound.bind(f"ipc://{events_out_path(ipc_dir)}")
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._forward, name="events-exchange", daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        try:
            zmq.proxy(self._inbound, self._outbound)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:
            log.error("events exchange stopped: %s", exc)


class EventsActor(ServiceActor):
    """Serves events.publish by publishing into the exchange like any other process."""

    def __init__(self, publisher: EventPublisher) -> None:
        super().__init__()
        self.publisher = publisher

    @handles("events.publish")
    def publish(self, req: PublishEvent, ctx: CallContext) -> Empty:
        """Publish a script's event under the caller's namespace."""
        self.publisher.publish(req.topic, ctx.namespace, req.event)
        return Empty()


def start(proc: ProcessContext) -> None:
    """Bind the exchange and serve events.publish."""
    proc.resources.append(EventsExchange(proc.config.ipc_dir))
    proc.serve(EventsActor, proc.events)
