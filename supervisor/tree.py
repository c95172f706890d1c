"""The supervision tree, with Erlang/OTP's semantics plus restart backoff.

Children start in order, each waited for until it reports ready; they stop in reverse
order (SIGTERM, then SIGKILL after the shutdown timeout). When a child exits:

- restart type: `permanent` always restarts, `transient` only after an abnormal exit
  (non-zero status or a signal), `temporary` never;
- strategy: `one_for_one` restarts that child; `rest_for_one` also stops the children
  started after it and restarts them after it, in order;
- intensity: more than `max_restarts` restarts within `max_seconds` escalates: the
  tree stops and the root exits non-zero (systemd decides what comes next);
- backoff (OTP has none): a child that crashes again soon waits 2x longer each time,
  from `backoff_initial` up to `backoff_max`, so a hot crash loop cannot burn the
  restart budget in microseconds or fork-storm the machine.

All bookkeeping and every waitpid happen in the SupervisorActor's thread.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil

from moord.actors.base import CallContext, ServiceActor, handles
from moord.messages.base import Empty
from moord.messages.system import ChildInfo, Shutdown, Tree, TreeReply
from moord.supervisor.child import READY_FD_ENV, SUPERVISOR_PID_ENV

log = logging.getLogger("moord.supervisor")

Strategy = Literal["one_for_one", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]


@dataclass(frozen=True)
class ChildSpec:
    """How to run and restart one child process."""

    name: str
    argv: list[str]
    restart: RestartType = "permanent"
    ready_timeout: float = 30.0
    shutdown_timeout: float = 5.0


@dataclass(frozen=True)
class SupervisorSpec:
    """The tree's strategy, restart intensity, backoff, and children in start order."""

    children: list[ChildSpec]
    strategy: Strategy = "one_for_one"
    max_restarts: int = 10
    max_seconds: float = 30.0
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    backoff_reset_after: float = 10.0


@dataclass
class ChildState:
    """What the tree knows of one child right now."""

    spec: ChildSpec
    pid: int = 0
    pidfd: int = -1
    state: str = "stopped"  # stopped, starting, running, restarting, exited, failed
    restarts: int = 0
    started_at: float = 0.0
    quick_failures: int = 0
    last_status: int | None = None
    stopping: bool = False


@dataclass
class ChildExited:
    """Notice from the main thread: SIGCHLD arrived, reap."""


@dataclass
class RestartDue:
    """A backoff timer fired for this child."""

    name: str
    generation: int


@dataclass
class StartAll:
    """Start every child in order; answers whether the tree is up."""


@dataclass
class StopAll:
    """Stop every child in reverse order."""

    reason: str = "shutdown"


class Escalation(Exception):
    """The restart intensity was exceeded or a child never became ready."""


@dataclass
class _Timers:
    generation: int = 0
    pending: dict[str, threading.Timer] = field(default_factory=dict)


class SupervisorActor(ServiceActor):
    """Owns the children: starts, watches, restarts, escalates and stops them."""

    def __init__(self, spec: SupervisorSpec, on_escalate: Any = None) -> None:
        super().__init__()
        self.spec = spec
        self.children = {c.name: ChildState(c) for c in spec.children}
        self.order = [c.name for c in spec.children]
        self.restart_times: collections.deque[float] = collections.deque()
        self.state = "starting"
        self.started_at = time.time()
        self.timers = _Timers()
        self.on_escalate = on_escalate

    # -- requests --------------------------------------------------------------

    @handles("supervisor.tree")
    def tree(self, req: Tree, ctx: CallContext) -> TreeReply:
        """The live tree: child, pid, state, restarts, uptime, memory."""
        now = time.time()
        infos = []
        for name in self.order:
            child = self.children[name]
            rss = 0
            if child.pid and child.state == "running":
                try:
                    rss = psutil.Process(child.pid).memory_info().rss
                except psutil.Error:
                    rss = 0
            infos.append(
                ChildInfo(
                    name=name,
                    pid=child.pid if child.state in ("running", "starting") else 0,
                    state=child.state,
                    restarts=child.restarts,
                    uptime=(now - child.started_at) if child.state == "running" else 0.0,
                    restart=child.spec.restart,
                    strategy=self.spec.strategy,
                    rss=rss,
                )
            )
        return TreeReply(
            pid=os.getpid(), uptime=now - self.started_at, strategy=self.spec.strategy, state=self.state, children=infos
        )

    @handles("supervisor.shutdown")
    def shutdown(self, req: Shutdown, ctx: CallContext) -> Empty:
        """Ask the root to stop (the main thread does it after answering)."""
        if self.on_escalate:
            self.on_escalate("shutdown requested", 0)
        return Empty()

    # -- internal messages -----------------------------------------------------

    def on_other(self, message: Any) -> Any:
        """Lifecycle notices from the main thread and from backoff timers."""
        if isinstance(message, ChildExited):
            self._reap()
        elif isinstance(message, RestartDue):
            if message.generation == self.timers.generation:
                self._restart_due(message.name)
        elif isinstance(message, StartAll):
            return self._start_all()
        elif isinstance(message, StopAll):
            self._stop_all(message.reason)
        return None

    def _start_all(self) -> bool:
        try:
            for name in self.order:
                self._spawn(self.children[name])
        except Escalation as exc:
            self._escalate(str(exc))
            return False
        self.state = "running"
        return True

    def _stop_all(self, reason: str) -> None:
        self.timers.generation += 1
        for timer in self.timers.pending.values():
            timer.cancel()
        self.timers.pending.clear()
        if self.state not in ("escalated",):
            self.state = "stopping"
        for name in reversed(self.order):
            self._stop_child(self.children[name])
        if self.state == "stopping":
            self.state = "stopped"
        log.info("all children stopped (%s)", reason)

    # -- process management ------------------------------------------------------

    def _spawn(self, child: ChildState) -> None:
        """Start one child and wait until it reports ready; Escalation if it never does."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        # Keep the child's copy off fd 3's own number so dup2 always clears CLOEXEC.
        high_w = fcntl.fcntl(write_fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(write_fd)
        env = dict(os.environ)
        env[READY_FD_ENV] = "3"
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        argv = child.spec.argv
        try:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, high_w, 3)])
        finally:
            os.close(high_w)
        child.pid = pid
        child.pidfd = os.pidfd_open(pid)
        child.state = "starting"
        child.stopping = False
        child.started_at = time.time()
        try:
            ready, _, _ = select.select([read_fd], [], [], child.spec.ready_timeout)
            token = os.read(read_fd, 1) if ready else b""
        finally:
            os.close(read_fd)
        if token == b"R":
            child.state = "running"
            log.info("child %s ready (pid %d)", child.spec.name, pid)
            return
        # It exited or hung before becoming ready.
        self._stop_child(child)
        child.state = "failed"
        raise Escalation(f"child {child.spec.name} did not become ready (exit status {child.last_status})")

    def _stop_child(self, child: ChildState) -> None:
        if child.pid == 0:
            if child.state in ("running", "starting", "restarting"):
                child.state = "stopped"
            return
        child.stopping = True
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self._wait_pidfd(child, child.spec.shutdown_timeout):
            log.warning("child %s did not stop within %.1fs: killing", child.spec.name, child.spec.shutdown_timeout)
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_pidfd(child, 5.0)
        self._collect(child)
        child.state = "stopped"

    def _wait_pidfd(self, child: ChildState, timeout: float) -> bool:
        if child.pidfd < 0:
            return True
        ready, _, _ = select.select([child.pidfd], [], [], timeout)
        return bool(ready)

    def _collect(self, child: ChildState) -> None:
        """Reap the child's exit status and release its pidfd."""
        if child.pid:
            try:
                _, status = os.waitpid(child.pid, os.WNOHANG if child.pidfd < 0 else 0)
                child.last_status = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass
        if child.pidfd >= 0:
            os.close(child.pidfd)
        child.pidfd = -1
        child.pid = 0

    def _reap(self) -> None:
        for child in self.children.values():
            if child.pid == 0 or child.stopping or child.state not in ("running",):
                continue
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 255 << 8
            if pid == 0:
                continue
            child.last_status = os.waitstatus_to_exitcode(status)
            if child.pidfd >= 0:
                os.close(child.pidfd)
            child.pidfd = -1
            child.pid = 0
            self._child_exited(child)

    def _child_exited(self, child: ChildState) -> None:
        status = child.last_status
        abnormal = status != 0
        how = f"killed by signal {-status}" if status is not None and status < 0 else f"exit status {status}"
        ran = time.time() - child.started_at
        log.warning("child %s exited (%s) after %.2fs", child.spec.name, how, ran)
        restart = child.spec.restart == "permanent" or (child.spec.restart == "transient" and abnormal)
        if not restart or self.state != "running":
            child.state = "exited"
            return
        now = time.time()
        self.restart_times.append(now)
        while self.restart_times and now - self.restart_times[0] > self.spec.max_seconds:
            self.restart_times.popleft()
        if len(self.restart_times) > self.spec.max_restarts:
            child.state = "failed"
            self._escalate(
                f"child {child.spec.name} exceeded the restart intensity "
                f"({self.spec.max_restarts} restarts in {self.spec.max_seconds:g}s); shutting down"
            )
            return
        child.quick_failures = 0 if ran >= self.spec.backoff_reset_after else child.quick_failures + 1
        delay = min(self.spec.backoff_max, self.spec.backoff_initial * (2 ** max(0, child.quick_failures - 1)))
        child.state = "restarting"
        if self.spec.strategy == "rest_for_one":
            for name in reversed(self.order[self.order.index(child.spec.name) + 1 :]):
                sibling = self.children[name]
                if sibling.pid:
                    log.info("rest_for_one: stopping %s after %s", name, child.spec.name)
                    self._stop_child(sibling)
                    sibling.state = "restarting"
        log.info("restarting %s in %.2fs", child.spec.name, delay)
        self._schedule(child.spec.name, delay)

    def _schedule(self, name: str, delay: float) -> None:
        generation = self.timers.generation
        ref = self.actor_ref
        timer = threading.Timer(delay, lambda: ref.tell(RestartDue(name, generation)))
        timer.daemon = True
        self.timers.pending[name] = timer
        timer.start()

    def _restart_due(self, name: str) -> None:
        self.timers.pending.pop(name, None)
        if self.state != "running":
            return
        names = [name]
        if self.spec.strategy == "rest_for_one":
            names += [n for n in self.order[self.order.index(name) + 1 :] if self.children[n].state == "restarting"]
        for each in names:
            child = self.children[each]
            try:
                self._spawn(child)
            except Escalation as exc:
                log.error("%s", exc)
                child.last_status = child.last_status if child.last_status is not None else 1
                child.state = "running"  # so _child_exited treats it as a crash
                child.started_at = time.time()
                self._child_exited(child)
                return
            child.restarts += 1

    def _escalate(self, reason: str) -> None:
        log.error("%s", reason)
        self.state = "escalated"
        self._stop_all(reason)
        if self.on_escalate:
            self.on_escalate(reason, 1)


def default_spec(config: Any, config_path: str) -> SupervisorSpec:
    """The daemon's tree: one child process per subsystem, in start order."""
    from moord.supervisor.process import PROCESSES

    sup = config.supervisor
    children = [
        ChildSpec(
            name=name,
            argv=[sys.executable, "-m", "moord.supervisor.child", name, config_path],
            restart="permanent",
            ready_timeout=sup.ready_timeout,
            shutdown_timeout=sup.shutdown_timeout,
        )
        for name in PROCESSES
    ]
    return SupervisorSpec(
        children=children,
        strategy=sup.strategy,
        max_restarts=sup.max_restarts,
        max_seconds=sup.max_seconds,
        backoff_initial=sup.backoff_initial,
        backoff_max=sup.backoff_max,
        backoff_reset_after=sup.backoff_reset_after,
    )
