"""The actor side of a request: a pykka actor whose methods serve request kinds.

The bridge validates a request and `tell`s the actor a Call. The actor runs the handler
registered for the kind and answers through the call's context. A handler may return
DEFERRED and answer later (tasks.wait does), so no thread is held while waiting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import pykka

from moord.messages.base import Message
from moord.messages.errors import DeadlineExceeded, Internal, MoordError

log = logging.getLogger(__name__)

DEFERRED = object()
"""Returned by a handler that will answer later through `ctx.reply` / `ctx.fail`."""


@dataclass
class CallContext:
    """Who asked, on whose behalf, until when, and how to answer."""

    kind: str
    namespace: str
    lease: str
    deadline: float
    frames: list[Any]
    answer: Callable[[Any, list[bytes], bool], None]
    answered: bool = field(default=False)

    def expired(self) -> bool:
        """Whether the caller has stopped waiting."""
        return bool(self.deadline) and time.time() > self.deadline

    def reply(self, result: Message | dict[str, Any] | None, frames: list[bytes] | None = None) -> None:
        """Answer with a reply message (plus optional bulk frames); only the first answer counts."""
        if self.answered:
            return
        self.answered = True
        payload = result.model_dump() if isinstance(result, Message) else (result or {})
        self.answer(payload, frames or [], False)

    def fail(self, error: MoordError) -> None:
        """Answer with a typed error."""
        if self.answered:
            return
        self.answered = True
        self.answer(error.to_wire(), [], True)


@dataclass
class Call:
    """A validated request on its way to an actor."""

    request: Message
    ctx: CallContext


Handler = Callable[[Any, Any, CallContext], Any]


def handles(kind: str) -> Callable[[Handler], Handler]:
    """Mark an actor method as the handler of request `kind`."""

    def mark(method: Handler) -> Handler:
        method._moord_kind = kind  # type: ignore[attr-defined]
        return method

    return mark


class ServiceActor(pykka.ThreadingActor):
    """Base of every subsystem actor: routes Calls to `@handles` methods, never dies of one."""

    handlers: ClassVar[dict[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, Handler] = {}
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                kind = getattr(value, "_moord_kind", None)
                if kind:
                    found[kind] = value
        cls.handlers = found

    @classmethod
    def kinds(cls) -> list[str]:
        """The request kinds this actor serves."""
        return sorted(cls.handlers)

    def on_receive(self, message: Any) -> Any:
        """Serve a Call; other messages go to `on_other`."""
        if not isinstance(message, Call):
            return self.on_other(message)
        ctx = message.ctx
        if ctx.expired():
            ctx.fail(DeadlineExceeded(f"{ctx.kind}: deadline passed while queued"))
            return None
        handler = self.handlers.get(ctx.kind)
        try:
            if handler is None:
                raise Internal(f"{ctx.kind} reached {type(self).__name__}, which does not serve it")
            result = handler(self, message.request, ctx)
        except MoordError as exc:
            ctx.fail(exc)
        except Exception as exc:  # an actor must survive any one request
            log.exception("%s failed", ctx.kind)
            ctx.fail(Internal(f"{ctx.kind}: {type(exc).__name__}: {exc}"))
        else:
            if result is not DEFERRED:
                ctx.reply(result)
        return None

    def on_other(self, message: Any) -> Any:
        """Messages that are not requests (timers, internal notices); override to use."""
        log.warning("%s ignored %r", type(self).__name__, message)
        return None


class PooledServiceActor(ServiceActor):
    """A ServiceActor whose long requests (imports, unpacks, diffs) run on a small worker
    pool and answer later, so the actor keeps serving while they run."""

    workers: ClassVar[int] = 2

    def __init__(self) -> None:
        super().__init__()
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"{type(self).__name__}-work")

    def on_stop(self) -> None:
        """Let running work finish in the background; drop what has not started."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run_later(self, ctx: CallContext, work: Callable[[], Any]) -> object:
        """Run `work` on the pool and answer `ctx` with its result or error; returns DEFERRED."""

        def run() -> None:
            try:
                ctx.reply(work())
            except MoordError as exc:
                ctx.fail(exc)
            except Exception as exc:  # a worker must answer whatever happens
                log.exception("%s failed", ctx.kind)
                ctx.fail(Internal(f"{ctx.kind}: {type(exc).__name__}: {exc}"))

        self.pool.submit(run)
        return DEFERRED
