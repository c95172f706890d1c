"""The one ZeroMQ bridge of a process: ROUTER on an ipc endpoint -> actor calls.

The bridge thread owns the ROUTER socket. It checks each request (size, msgpack,
envelope, version, deadline, kind, payload) and answers every defect with an error
reply; valid requests go to the serving actor as a Call. Actors answer from their own
threads through a lock-guarded PUSH socket that the bridge thread drains.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pykka
import zmq

from moord import __version__
from moord.actors.base import Call, CallContext
from moord.messages import envelope as codec
from moord.messages.base import KindSpec
from moord.messages.errors import MoordError, Unimplemented
from moord.messages.registry import KINDS
from moord.messages.requests import decode_request, request_id_of
from moord.messages.routes import SERVICE_PROCESS

log = logging.getLogger(__name__)


class Bridge:
    """Serves the request kinds of this process's actors on one ipc endpoint."""

    def __init__(self, process: str, path: str, context: zmq.Context | None = None) -> None:
        self.process = process
        self.path = path
        self._context = context or zmq.Context.instance()
        self._routes: dict[str, pykka.ActorRef] = {}
        self._replies_addr = f"inproc://bridge-replies-{id(self):x}"
        self._push_lock = threading.Lock()
        self._push: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def serve(self, actor_ref: pykka.ActorRef, kinds: list[str]) -> None:
        """Route `kinds` to the actor (call before start)."""
        for kind in kinds:
            if kind not in KINDS:
                raise RuntimeError(f"{kind} is not a declared request kind")
            self._routes[kind] = actor_ref

    @property
    def services(self) -> list[str]:
        """Service prefixes served here."""
        return sorted({k.split(".", 1)[0] for k in self._routes})

    def start(self) -> None:
        """Bind the endpoint (mode 0600) and start serving; returns once bound."""
        self._thread = threading.Thread(target=self._run, name=f"bridge-{self.process}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error

    def stop(self) -> None:
        """Stop serving and unlink the endpoint."""
        self._stopping.set()
        if self._thread:
            self._thread.join(5)

    # -- bridge thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            router = self._bind()
            pull = self._context.socket(zmq.PULL)
            pull.bind(self._replies_addr)
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._replies_addr)
            self._push = push
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                for sock, _ in poller.poll(200):
                    if sock is router:
                        self._drain_requests(router)
                    else:
                        self._drain_replies(pull, router)
        finally:
            for sock in (router, pull, push):
                sock.close(linger=0)
            if os.path.exists(self.path):
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    def _bind(self) -> zmq.Socket:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, codec.SOCKET_MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            router.bind(f"ipc://{self.path}")
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        return router

    def _drain_requests(self, router: zmq.Socket) -> None:
        for _ in range(256):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = parts[0].bytes
            try:
                self._dispatch(identity, parts[1:], router)
            except MoordError as exc:
                router.send_multipart([identity, codec.reply_frame(request_id_of(exc), exc.to_wire(), True)])
            except Exception as exc:  # never let one request kill the bridge
                log.exception("bridge %s: unexpected failure", self.process)
                router.send_multipart(
                    [identity, codec.reply_frame("", {"code": "internal", "message": str(exc)}, True)]
                )

    def _dispatch(self, identity: bytes, frames: list[Any], router: zmq.Socket) -> None:
        request = decode_request([f.buffer for f in frames], self._accept)
        env = request.envelope
        if env.kind == "system.ping":
            reply = {"process": self.process, "pid": os.getpid(), "version": __version__, "services": self.services}
            router.send_multipart([identity, codec.reply_frame(request.request_id, reply)])
            return
        ctx = CallContext(
            kind=env.kind,
            namespace=env.ns,
            lease=env.lease,
            deadline=env.deadline,
            frames=request.extra,
            answer=self._answerer(identity, request.request_id),
        )
        try:
            self._routes[env.kind].tell(Call(request.message, ctx))
        except pykka.ActorDeadError:
            ctx.fail(Unimplemented(f"{env.kind}: its actor has stopped"))

    def _accept(self, spec: KindSpec) -> None:
        if spec.kind != "system.ping" and spec.kind not in self._routes:
            owner = SERVICE_PROCESS.get(spec.service, "?")
            raise Unimplemented(f"{spec.kind} is served by process {owner!r}, not {self.process!r}")

    def _answerer(self, identity: bytes, request_id: str):  # type: ignore[no-untyped-def]
        def answer(payload: Any, frames: list[bytes], is_error: bool) -> None:
            head = codec.reply_frame(request_id, payload, is_error)
            with self._push_lock:
                if self._push is not None:
                    self._push.send_multipart([identity, head, *frames], copy=False)

        return answer

    def _drain_replies(self, pull: zmq.Socket, router: zmq.Socket) -> None:
        for _ in range(256):
            try:
                parts = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                router.send_multipart(parts, copy=False)
            except zmq.ZMQError:
                log.debug("bridge %s: client went away before its reply", self.process)


