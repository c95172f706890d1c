"""A thread-safe ZeroMQ client for moord's processes (and for scripts).

Each thread gets its own DEALER socket per endpoint (ZeroMQ sockets are not thread
safe); all share one context. Every call has a deadline: it is written into the
envelope (the server drops requests whose deadline passed) and bounds the wait here,
so a stopped daemon or a restarting child answers Unavailable, never a hang.
Imports only pyzmq and msgpack: clients start fast.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from typing import Any, Iterator, Sequence

import zmq

from moord.messages import envelope as codec
from moord.messages.errors import (
    DeadlineExceeded,
    Internal,
    MoordError,
    Unavailable,
    Unimplemented,
    error_from_wire,
)
from moord.messages.routes import process_for

DEFAULT_TIMEOUT = 10.0
_ids = itertools.count(1)


def endpoint_path(ipc_dir: str, process: str) -> str:
    """The filesystem path of a process's ipc endpoint."""
    return os.path.join(ipc_dir, f"{process}.sock")


class Client:
    """Calls request kinds on moord's processes; safe to share between threads."""

    def __init__(
        self,
        ipc_dir: str,
        namespace: str = codec.DEFAULT_NAMESPACE,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.Context | None = None,
    ) -> None:
        self.ipc_dir = ipc_dir
        self.namespace = namespace
        self.timeout = timeout
        self._context = context or zmq.Context.instance()
        self._local = threading.local()
        self._prefix = f"{os.getpid()}-{id(self):x}-"

    def call(
        self,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        frames: Sequence[bytes] = (),
        namespace: str | None = None,
        timeout: float | None = None,
        lease: str = "",
        address: str | None = None,
    ) -> dict[str, Any]:
        """Send one request and return the reply payload; errors raise their typed class."""
        reply, _ = self.call_frames(
            kind, payload, frames=frames, namespace=namespace, timeout=timeout, lease=lease, address=address
        )
        return reply

    def call_frames(
        self,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        frames: Sequence[bytes] = (),
        namespace: str | None = None,
        timeout: float | None = None,
        lease: str = "",
        address: str | None = None,
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Like `call`, also returning the reply's extra (bulk) frames."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.time() + wait
        if address is None:
            try:
                address = endpoint_path(self.ipc_dir, process_for(kind))
            except KeyError:
                raise Unimplemented(f"unknown request kind {kind!r}") from None
        path = address
        if not os.path.exists(path):
            raise Unavailable(f"{kind}: nothing listens at {path} (is moord running?)")
        request_id = self._prefix + str(next(_ids))
        head = codec.request_frame(
            request_id, kind, payload or {}, namespace or self.namespace, deadline, lease
        )
        sock = self._socket(path)
        try:
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(wait * 1000)))
            sock.send_multipart([head, *frames], copy=len(head) + sum(map(len, frames)) < 65536)
        except zmq.Again:
            self._drop_socket(path)
            raise Unavailable(f"{kind}: {path} did not accept the request within {wait:.1f}s") from None
        while True:
            remaining = deadline - time.time()
            if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000))):
                # The socket may still hold the request or a late reply: start afresh.
                self._drop_socket(path)
                raise DeadlineExceeded(f"{kind}: no reply from {path} within {wait:.1f}s")
            parts = sock.recv_multipart(copy=False)
            try:
                reply = codec.unpack(parts[0].bytes)
            except MoordError:
                raise Internal(f"{kind}: malformed reply from {path}") from None
            if not isinstance(reply, dict):
                continue
            if reply.get("id") != request_id:
                if reply.get("id") == "" and reply.get("kind") == codec.ERROR:
                    raise error_from_wire(reply.get("payload"))  # the server could not read our request
                continue  # a late reply to an earlier, timed-out request
            if reply.get("kind") == codec.ERROR:
                raise error_from_wire(reply.get("payload"))
            body = reply.get("payload")
            return (body if isinstance(body, dict) else {}), [p.buffer for p in parts[1:]]

    @contextlib.contextmanager
    def temporary_lease(self, namespace: str | None = None, expire_after: float = 24 * 3600.0) -> Iterator[str]:
        """A lease for the duration of an operation, as ctr takes one: what the operation
        creates cannot be collected before it is referenced. It expires by itself if the
        caller dies; it is deleted (without a synchronous collection) at the end."""
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expire_after))
        lease = self.call(
            "leases.create", {"labels": {"containerd.io/gc.expire": expires}}, namespace=namespace
        )["lease"]["id"]
        try:
            yield lease
        finally:
            try:
                self.call("leases.delete", {"id": lease}, namespace=namespace)
            except MoordError:
                pass  # it expires by itself

    def _socket(self, path: str) -> zmq.Socket:
        sockets: dict[str, zmq.Socket] = self._local.__dict__.setdefault("sockets", {})
        sock = sockets.get(path)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Queue only to live connections, so a dead peer makes send time out.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 20)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
            sock.connect(f"ipc://{path}")
            sockets[path] = sock
        return sock

    def _drop_socket(self, path: str) -> None:
        sockets: dict[str, zmq.Socket] = self._local.__dict__.setdefault("sockets", {})
        sock = sockets.pop(path, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        """Close this thread's sockets."""
        for path in list(self._local.__dict__.get("sockets", {})):
            self._drop_socket(path)
