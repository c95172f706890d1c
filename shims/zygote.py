"""The shim zygote: a pre-loaded, single-threaded process that forks shims on request.

Starting a Python shim from scratch costs an interpreter start plus imports of zmq and
msgpack. The zygote pays that once: the runtime actor starts it as its child (it dies
with the runtime through PR_SET_PDEATHSIG), and asks it over a socketpair to spawn a
shim. Its forker child (see _Forker) forks; that child calls setsid and forks again, so
the grandchild (the shim) has its own session and is re-parented away from the daemon;
the grandchild binds its endpoint and reports its pid through a pipe. The zygote must
never create a ZeroMQ context or a thread: fork would copy them broken.

Memory: a shim's cost is the pages it does not share with the others. So the zygote
loads only what a shim runs (never pydantic: the shim decodes its requests with
shims/wire.py), runs a shim's paths once (_warm_up: CPython 3.11 specialises bytecode
in place), freezes the GC (gc.freeze) so that a shim's collections never walk, and
thereby dirty, the objects it shares, and leaves the forking to a child that writes
almost nothing between forks.

Latency: one shim is kept forked ahead (detached, blocked on a pipe until it is given
its config), so a create waits only for its bind. A spawn may carry the task's
shim.create payload: the shim then runs runc create at once, binds while runc works,
and its ready report carries the create's outcome (one round trip less). The next idle
shim is forked once the node has been quiet for IDLE_FORK_QUIET seconds, so that its
fork does not compete for the CPU with the runc create/start it would delay.

Protocol on the socketpair: one JSON object per line each way.
  zygote -> runtime at start: {"ready": true, "pid": N}
  runtime -> zygote: {"config": ShimConfig.to_dict(), "create": {...} (optional)}
  zygote -> runtime: {"pid": N, "ready_ms": F, "report": {...}}  or  {"error": "..."}
    where report is run_shim's: {} or {"create": reply} or {"error": wire error}
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from moord.messages import envelope as codec
from moord.messages.errors import Internal, InvalidArgument, MoordError, Unavailable
from moord.shims import wire
from moord.linux.process import PR_SET_PDEATHSIG, prctl
from moord.shims.shim import SHIM_LOG_FILE, ShimConfig, configure_logging, run_shim
from setproctitle import setproctitle

# Everything a shim imports lazily is loaded here once, so forked shims share it.
# Never pydantic: see shims/wire.py (tests/test_shim_memory.py checks it stays out).
import moord.linux.mount  # noqa: E402,F401
import moord.shims.cgroups  # noqa: E402,F401

ZYGOTE_TITLE = "moord-shim: zygote"
FORKER_TITLE = "moord-shim: zygote forker"
IDLE_TITLE = "moord-shim: idle"
SPAWN_TIMEOUT = 15.0
START_TIMEOUT = 30.0
# The next idle shim is forked after this long without a request (a spawn meanwhile forks
# on demand): a busy node's runc runs keep the CPU.
IDLE_FORK_QUIET = 0.1
CREATE_TIMEOUT = 30.0  # a spawn's runc create (a big spec can take a while)
HANDOFF_TIMEOUT = 5.0  # for a new idle shim's pipes (it needs only two forks)


# -- inside the zygote ---------------------------------------------------------------


def serve_zygote(fd: int, parent_pid: int) -> None:
    """The zygote's loop: spawn one shim per request line until the runtime hangs up."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the runtime died before PDEATHSIG was armed
        os._exit(0)
    setproctitle(ZYGOTE_TITLE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runtime decides when we stop
    sock = socket.socket(fileno=fd)
    reader = sock.makefile("rb")
    configure_logging()  # once here, shared, rather than in every shim
    _warm_up()
    # Everything loaded so far goes to the permanent generation: a shim's collections
    # then never walk (and so never dirty) the pages it shares with us.
    gc.collect()
    gc.freeze()
    forker = _Forker.start(close_in_child=(sock.fileno(),))
    sock.sendall(json.dumps({"ready": True, "pid": os.getpid()}).encode() + b"\n")
    idle = forker.idle() if forker is not None else None
    while True:
        # Requests come one at a time (the runtime waits for each answer), so the reader's
        # buffer is empty here and select on the socket tells whether one is pending.
        if idle is None and forker is not None and not select.select([sock], [], [], IDLE_FORK_QUIET)[0]:
            idle = forker.idle()
        line = reader.readline()
        if not line:
            break
        try:
            request = json.loads(line)
            config = ShimConfig.from_dict(request["config"])
            create = request.get("create")
            pid, ready_ms, report = -1, 0.0, {}
            timeout = SPAWN_TIMEOUT + (CREATE_TIMEOUT if create is not None else 0.0)
            if idle is None and forker is not None:
                idle = forker.idle()  # on demand: no quiet moment since the last spawn
            if idle is not None:
                try:
                    pid, ready_ms, report = idle.become(config, create, timeout)
                except _IdleGone:
                    pid = -1  # it died idle (killed by someone): fork a fresh one below
                idle = None
            if pid < 0:  # no forker, or the idle shim died: fork from here
                pid, ready_ms, report = spawn_detached(config, create, timeout)
            answer = {"pid": pid, "ready_ms": ready_ms, "report": report}
        except MoordError as exc:
            answer = {"error": exc.message, "code": exc.code}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}", "code": "internal"}
        sock.sendall(json.dumps(answer).encode() + b"\n")
    os._exit(0)


class _IdleGone(Exception):
    """The pre-forked shim died before it was given a task."""


class _Forker:
    """A child of the zygote that does nothing but fork idle shims, one per byte it reads.

    Memory: a page is shared by the shims only while no process writes it. The zygote
    writes many pages for each spawn (parsing, answering, allocating), and each shim
    forked between two such rounds would keep its own copy of them, privately. The forker
    is forked once, after the warm-up, and its loop (read a byte, fork, reap) writes
    almost nothing, so the shims it forks share nearly all their pages with it and each
    other. Each idle shim hands its pipes' far ends to the zygote over a unix socket.
    """

    def __init__(self, pid: int, order_w: int, handoff: socket.socket) -> None:
        self.pid = pid
        self.order_w = order_w
        self.handoff = handoff

    @classmethod
    def start(cls, close_in_child: tuple[int, ...]) -> "_Forker | None":
        """Fork the forker (None if that fails: shims are then forked by the zygote itself)."""
        try:
            order_r, order_w = os.pipe2(os.O_CLOEXEC)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return None
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:
            for fd in (order_r, order_w):
                os.close(fd)
            ours.close()
            theirs.close()
            return None
        if pid == 0:  # pragma: no cover - runs in the forker
            try:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                for fd in (order_w, ours.fileno(), *close_in_child):
                    os.close(fd)
                setproctitle(FORKER_TITLE)
                _forker_loop(order_r, theirs.fileno())
            finally:
                os._exit(0)
        os.close(order_r)
        theirs.close()
        return cls(pid, order_w, ours)

    def idle(self, timeout: float = HANDOFF_TIMEOUT) -> "_IdleShim | None":
        """A fresh idle shim (None if the forker failed: the request then forks on demand)."""
        try:
            os.write(self.order_w, b"f")
            self.handoff.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(self.handoff, 64, 2)
        except OSError:
            return None
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return None
        return _IdleShim(fds[0], fds[1])


def _forker_loop(order_r: int, handoff: int) -> None:
    """The forker: per byte read, fork an idle shim; exit when the zygote goes away."""
    while os.read(order_r, 1):
        try:
            child = os.fork()
        except OSError:
            continue  # the zygote's recv times out and it forks the shim itself
        if child == 0:  # pragma: no cover - the idle shim's first fork
            _become_idle(order_r, handoff)
        os.waitpid(child, 0)


def _become_idle(order_r: int, handoff: int) -> None:
    """In the forker's child: detach, hand the pipes' far ends to the zygote, wait for a
    config and become its shim (never returns)."""
    ready_w = -1
    try:
        os.close(order_r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        config_r, config_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        channel = socket.socket(fileno=handoff)
        socket.send_fds(channel, [b"idle"], [config_w, ready_r])
        channel.detach()
        _detach(None, (config_r, ready_w))  # closes the handoff socket and the far ends too
        setproctitle(IDLE_TITLE)
        data = _read_until_eof(config_r, None)
        if not data:
            os._exit(0)  # the zygote went away without using us
        handed = json.loads(data)
        config = ShimConfig.from_dict(handed["config"])
        os.close(config_r)
        if not os.path.isdir(config.bundle):
            raise InvalidArgument(f"bundle {config.bundle} does not exist")
        _log_to_bundle(config)
        run_shim(config, ready_w, handed.get("create"))
        os._exit(0)
    except BaseException as exc:
        if ready_w >= 0:
            try:
                os.write(ready_w, f"!{type(exc).__name__}: {exc}".encode()[:4000])
            except OSError:
                pass
        os._exit(1)


class _IdleShim:
    """A shim forked (and detached) ahead of time, blocked until it is given its config.

    The fork (by the _Forker), the second fork, setsid and the fd clean-up are paid
    between requests, so a create waits only for the shim's bind. A shim that dies idle
    is replaced; one whose zygote goes away reads EOF and exits.
    """

    def __init__(self, config_w: int, ready_r: int) -> None:
        self.config_w = config_w
        self.ready_r = ready_r

    def become(
        self, config: ShimConfig, create: dict[str, Any] | None = None, timeout: float = SPAWN_TIMEOUT
    ) -> tuple[int, float, dict[str, Any]]:
        """Hand the config (and a shim.create payload) over; return the shim's pid,
        config-to-ready ms and its ready report."""
        if not os.path.isdir(config.bundle):
            self.close()
            raise InvalidArgument(f"bundle {config.bundle} does not exist")
        started = time.monotonic()
        try:
            os.write(self.config_w, json.dumps({"config": config.to_dict(), "create": create}).encode())
        except OSError:  # EPIPE: the idle shim is gone
            self.close()
            raise _IdleGone() from None
        os.close(self.config_w)
        self.config_w = -1
        try:
            data = _read_until_eof(self.ready_r, timeout)
        finally:
            self.close()
        if not data.strip():
            raise _IdleGone()
        pid, report = _ready_report(config, data)
        return pid, (time.monotonic() - started) * 1000.0, report

    def close(self) -> None:
        """Close our ends (an idle shim then reads EOF and exits)."""
        for name in ("config_w", "ready_r"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _warm_up() -> None:
    """Run the paths every shim runs (request decoding, replies, a child process), so
    that CPython's adaptive interpreter specialises their bytecode here, once, rather
    than writing into the shared code objects of every shim."""
    frames = [
        codec.request_frame("w", kind, payload)
        for kind, payload in (
            ("shim.create", {"rootfs": [{"type": "overlay", "source": "overlay", "options": ["ro"]}], "stdout": "/x"}),
            ("shim.start", {}),
            ("shim.wait", {}),
            ("shim.state", {}),
            ("shim.kill", {"signal": 9}),
            ("shim.delete", {}),
        )
    ]
    for _ in range(16):  # past the interpreter's warm-up counters
        for frame in frames:
            request = wire.decode(frame, wire.REQUESTS)
            codec.reply_frame(request.request_id, {"pid": 1, "exited_at": 0.0}, False)
    for _ in range(2):
        subprocess.run(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)


def _ready_report(config: ShimConfig, data: bytes) -> tuple[int, dict[str, Any]]:
    """A shim's ready report ("<pid>\n<json>", see run_shim): its pid and report."""
    text = data.decode(errors="replace").strip()
    if not text:
        raise Internal(f"shim for {config.namespace}/{config.container_id} died before it was ready")
    if text.startswith("!"):
        raise Internal(f"shim for {config.namespace}/{config.container_id} failed: {text[1:]}")
    pid_text, _, report_text = text.partition("\n")
    try:
        report = json.loads(report_text) if report_text else {}
        return int(pid_text), report if isinstance(report, dict) else {}
    except ValueError:
        raise Internal(f"shim for {config.namespace}/{config.container_id} sent a bad ready report") from None


def spawn_detached(
    config: ShimConfig, create: dict[str, Any] | None = None, timeout: float = SPAWN_TIMEOUT
) -> tuple[int, float, dict[str, Any]]:
    """Fork a detached shim (setsid + double fork); return its pid, fork-to-ready ms and
    ready report (with `create`, the shim.create outcome: see run_shim).

    Call only from a single-threaded process without a ZeroMQ context (the zygote, or
    the `moord-shim spawn` command).
    """
    if not os.path.isdir(config.bundle):
        raise InvalidArgument(f"bundle {config.bundle} does not exist")
    started = time.monotonic()
    gc.freeze()  # this request's objects too (freeze is cheap: it moves a list head)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked children
        try:
            os.close(ready_r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _detach(config, (ready_w,))
            run_shim(config, ready_w, create)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    os.close(ready_w)
    try:
        os.waitpid(child, 0)
        data = _read_until_eof(ready_r, timeout)
    finally:
        os.close(ready_r)
    pid, report = _ready_report(config, data)
    return pid, (time.monotonic() - started) * 1000.0, report


def _detach(config: ShimConfig | None, keep_fds: tuple[int, ...]) -> None:
    """In the grandchild: stdin from /dev/null, stdout/stderr to the bundle's shim.log
    (to /dev/null until a pre-forked shim knows its bundle), close everything else."""
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(null, 2)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep_fds:
            try:
                os.close(fd)
            except OSError:
                pass
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    if config is not None:
        _log_to_bundle(config)


def _log_to_bundle(config: ShimConfig) -> None:
    """stdout and stderr to the bundle's shim.log."""
    logfd = os.open(os.path.join(config.bundle, SHIM_LOG_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(logfd)


def _read_until_eof(fd: int, timeout: float | None) -> bytes:
    """Everything written to `fd` until its writers close it (no limit when timeout is None)."""
    deadline = time.monotonic() + timeout if timeout is not None else None
    chunks = []
    while True:
        remaining = deadline - time.monotonic() if deadline is not None else None
        if remaining is not None and remaining <= 0:
            raise Internal("shim did not report ready in time")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- the runtime's side ----------------------------------------------------------------


@dataclass
class SpawnResult:
    """A started shim; `created` / `create_error` is the outcome of a spawn's shim.create."""

    pid: int
    ready_ms: float
    created: dict[str, Any] | None = None
    create_error: dict[str, Any] | None = None


class Zygote:
    """The runtime's handle on its zygote child: start, spawn shims, stop. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader = None

    @property
    def pid(self) -> int:
        """The zygote's pid (0 when not running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else 0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the zygote and wait until it has loaded everything."""
        with self._lock:
            self._start_locked(timeout)

    def _start_locked(self, timeout: float) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "moord.shims.main",
                    "zygote",
                    "--fd",
                    str(theirs.fileno()),
                    "--parent",
                    str(os.getpid()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        ours.settimeout(timeout)
        self._sock = ours
        self._reader = ours.makefile("rb")
        try:
            hello = json.loads(self._reader.readline() or b"{}")
        except (OSError, ValueError):
            hello = {}
        if not hello.get("ready"):
            self._stop_locked()
            raise Unavailable("the shim zygote did not start")

    def spawn(self, config: ShimConfig, create: dict[str, Any] | None = None, timeout: float = SPAWN_TIMEOUT) -> SpawnResult:
        """Have the zygote start a detached shim for `config` (that creates its task from
        `create`, a shim.create payload, when given); restarts a dead zygote once."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop_locked()
                self._start_locked(START_TIMEOUT)
            assert self._sock is not None and self._reader is not None
            self._sock.settimeout(timeout + 5 + (CREATE_TIMEOUT if create is not None else 0.0))
            try:
                self._sock.sendall(json.dumps({"config": config.to_dict(), "create": create}).encode() + b"\n")
                line = self._reader.readline()
            except OSError as exc:
                self._stop_locked()
                raise Unavailable(f"the shim zygote failed: {exc}") from None
            if not line:
                self._stop_locked()
                raise Unavailable("the shim zygote exited")
            answer = json.loads(line)
        if "error" in answer:
            raise (InvalidArgument if answer.get("code") == "invalid_argument" else Internal)(answer["error"])
        report = answer.get("report") or {}
        return SpawnResult(
            pid=int(answer["pid"]),
            ready_ms=float(answer["ready_ms"]),
            created=report.get("create"),
            create_error=report.get("error"),
        )

    def stop(self) -> None:
        """Hang up; the zygote exits on EOF (or is killed after a grace period)."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None
