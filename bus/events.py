"""Events over PUB/SUB through the events exchange.

Publishers connect a PUB socket to the exchange's inbound endpoint; the exchange
forwards to its outbound endpoint, where subscribers connect SUB sockets filtered by
topic prefix. Both ends reconnect by themselves when the exchange restarts.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterable

import zmq

from moord.messages import envelope as codec

EVENTS_IN = "events-in"
EVENTS_OUT = "events-out"


def events_in_path(ipc_dir: str) -> str:
    """Where publishers connect."""
    return os.path.join(ipc_dir, f"{EVENTS_IN}.sock")


def events_out_path(ipc_dir: str) -> str:
    """Where subscribers connect."""
    return os.path.join(ipc_dir, f"{EVENTS_OUT}.sock")


class EventPublisher:
    """Publishes events from any thread of a process."""

    def __init__(self, ipc_dir: str, context: zmq.Context | None = None) -> None:
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._sock = self._context.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.SNDHWM, 10000)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self._sock.connect(f"ipc://{events_in_path(ipc_dir)}")

    def publish(self, topic: str, namespace: str, event: Any) -> None:
        """Publish one event (a pydantic model or a dict)."""
        body = event.model_dump() if hasattr(event, "model_dump") else dict(event)
        frames = codec.event_frames(topic, namespace, body)
        with self._lock:
            self._sock.send_multipart(frames)

    def close(self) -> None:
        """Close the socket, flushing queued events for a short while."""
        with self._lock:
            self._sock.close()


class EventSubscriber:
    """Receives events whose topic starts with one of the given prefixes."""

    def __init__(
        self, ipc_dir: str, topics: Iterable[str] = ("",), context: zmq.Context | None = None
    ) -> None:
        self._context = context or zmq.Context.instance()
        self._sock = self._context.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 50)
        for topic in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(f"ipc://{events_out_path(ipc_dir)}")

    def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event envelope, or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(wait):
                return None
            parts = self._sock.recv_multipart()
            if len(parts) != 2:
                continue
            try:
                body = codec.unpack(parts[1])
            except Exception:
                continue  # a malformed event must not stop a subscriber
            if isinstance(body, dict):
                return body

    def fileno(self) -> int:
        """A descriptor that polls readable when events may be waiting."""
        return int(self._sock.getsockopt(zmq.FD))

    def close(self) -> None:
        """Close the subscription."""
        self._sock.close(linger=0)
