"""The shim zygote: a pre-loaded, single-threaded process that forks shims on request.

Starting a Python shim from scratch costs an interpreter start plus imports of zmq,
msgpack, pydantic and the message models. The zygote pays that once: the runtime actor
starts it as its child (it dies with the runtime through PR_SET_PDEATHSIG), and asks it
over a socketpair to spawn a shim. The zygote forks; the child calls setsid and forks
again, so the grandchild (the shim) has its own session and is re-parented away from
the daemon; the grandchild binds its endpoint and reports its pid through a pipe. The
zygote must never create a ZeroMQ context or a thread: fork would copy them broken.

Protocol on the socketpair: one JSON object per line each way.
  zygote -> runtime at start: {"ready": true, "pid": N}
  runtime -> zygote: {"config": ShimConfig.to_dict()}
  zygote -> runtime: {"pid": N, "ready_ms": F}  or  {"error": "..."}
"""

from __future__ import annotations

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

from moord.messages.errors import Internal, InvalidArgument, MoordError, Unavailable
from moord.linux.process import PR_SET_PDEATHSIG, prctl
from moord.shims.shim import SHIM_LOG_FILE, ShimConfig, run_shim

# Everything a shim imports lazily is loaded here once, so forked shims share it.
import moord.linux.mount  # noqa: E402,F401
import moord.messages.requests  # noqa: E402,F401
import moord.shims.cgroups  # noqa: E402,F401

ZYGOTE_TITLE = "moord-shim: zygote"
SPAWN_TIMEOUT = 15.0
START_TIMEOUT = 30.0


# -- inside the zygote ---------------------------------------------------------------


def serve_zygote(fd: int, parent_pid: int) -> None:
    """The zygote's loop: spawn one shim per request line until the runtime hangs up."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the runtime died before PDEATHSIG was armed
        os._exit(0)
    from setproctitle import setproctitle

    setproctitle(ZYGOTE_TITLE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runtime decides when we stop
    sock = socket.socket(fileno=fd)
    reader = sock.makefile("rb")
    sock.sendall(json.dumps({"ready": True, "pid": os.getpid()}).encode() + b"\n")
    for line in reader:
        try:
            request = json.loads(line)
            config = ShimConfig.from_dict(request["config"])
            pid, ready_ms = spawn_detached(config)
            answer = {"pid": pid, "ready_ms": ready_ms}
        except MoordError as exc:
            answer = {"error": exc.message, "code": exc.code}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}", "code": "internal"}
        sock.sendall(json.dumps(answer).encode() + b"\n")
    os._exit(0)


def spawn_detached(config: ShimConfig, timeout: float = SPAWN_TIMEOUT) -> tuple[int, float]:
    """Fork a detached shim (setsid + double fork); return its pid and fork-to-ready ms.

    Call only from a single-threaded process without a ZeroMQ context (the zygote, or
    the `moord-shim spawn` command).
    """
    if not os.path.isdir(config.bundle):
        raise InvalidArgument(f"bundle {config.bundle} does not exist")
    started = time.monotonic()
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked children
        try:
            os.close(ready_r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _detach(config, ready_w)
            run_shim(config, ready_w)
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
    text = data.decode(errors="replace").strip()
    if not text:
        raise Internal(f"shim for {config.namespace}/{config.container_id} died before it was ready")
    if text.startswith("!"):
        raise Internal(f"shim for {config.namespace}/{config.container_id} failed: {text[1:]}")
    return int(text), (time.monotonic() - started) * 1000.0


def _detach(config: ShimConfig, keep_fd: int) -> None:
    """In the grandchild: stdio to /dev/null and the bundle's shim.log, close everything else."""
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDONLY)
    logfd = os.open(os.path.join(config.bundle, SHIM_LOG_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep_fd:
            try:
                os.close(fd)
            except OSError:
                pass
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _read_until_eof(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
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
    """A started shim."""

    pid: int
    ready_ms: float


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

    def spawn(self, config: ShimConfig, timeout: float = SPAWN_TIMEOUT) -> SpawnResult:
        """Have the zygote start a detached shim for `config`; restarts a dead zygote once."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop_locked()
                self._start_locked(START_TIMEOUT)
            assert self._sock is not None and self._reader is not None
            self._sock.settimeout(timeout + 5)
            try:
                self._sock.sendall(json.dumps({"config": config.to_dict()}).encode() + b"\n")
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
        return SpawnResult(pid=int(answer["pid"]), ready_ms=float(answer["ready_ms"]))

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
