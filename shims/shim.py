"""moord-shim: one process per container, detached from the daemon, owning runc for it.

The shim is the container init's parent (child subreaper), so it alone can learn the
exit status. It is single-threaded: one loop polls its ROUTER endpoint and a signal
wakeup pipe (SIGCHLD). runc runs synchronously through subprocess, and exits are reaped
only in the loop (waitpid(-1, WNOHANG)), never while a runc child is outstanding, so a
reap can never steal runc's own exit status.

Bundle layout (containerd's runtime v2 layout, plus our files):
  <state>/io.containerd.runtime.v2.task/<ns>/<id>/
    config.json  the OCI spec            rootfs/   mount point of the container's rootfs
    address      the shim's ipc address  shim.pid  the shim's pid
    init.pid     the container init's    exit      {"pid","exit_status","exited_at"}
    log.json     runc's log (json)       shim.log  the shim's own stderr

stdio is passed through: the shim opens the FIFOs and hands them to runc as the
container's fds 0-2, then closes its copies. Log files and copy loops (needed for
reconnecting clients and terminals) come in a later issue.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import zmq

from moord.linux.files import read_small, write_atomic
from moord.linux.process import PR_SET_CHILD_SUBREAPER, prctl
from moord.messages import envelope as codec
from moord.messages.base import Envelope, KindSpec, Message, validate_payload
from moord.messages.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MoordError,
    NotFound,
    Unimplemented,
)
from moord.messages.registry import KINDS
from moord.messages.shim import ShimCreate, ShimDelete, ShimKill, ShimStart, ShimState, ShimWait
from moord.messages.tasks import DeleteTaskReply, PidReply, Process, ProcessReply, WaitReply

log = logging.getLogger("moord.shim")

BUNDLES_DIR = "io.containerd.runtime.v2.task"
SOCKETS_DIR = "s"
ADDRESS_FILE = "address"
SHIM_PID_FILE = "shim.pid"
INIT_PID_FILE = "init.pid"
EXIT_FILE = "exit"
CONFIG_FILE = "config.json"
ROOTFS_DIR = "rootfs"
RUNC_LOG_FILE = "log.json"
SHIM_LOG_FILE = "shim.log"
TITLE_PREFIX = "moord-shim: "
# How often the idle loop checks that its bundle still exists (a removed bundle means
# nobody will ever delete us: clean up and exit rather than leak).
IDLE_CHECK_SECONDS = 2.0
RUNC_TIMEOUT = 60.0


# -- the bundle on disk (shared with the runtime actor) ------------------------------


def bundle_path(state: str, namespace: str, container_id: str) -> str:
    """The bundle directory of a task."""
    return os.path.join(state, BUNDLES_DIR, namespace, container_id)


def shim_socket_path(state: str, namespace: str, container_id: str) -> str:
    """A short, fixed-length socket path (unix socket paths must stay under ~100 bytes)."""
    digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:32]
    return os.path.join(state, SOCKETS_DIR, f"{digest}.sock")


def runc_root(state: str, namespace: str) -> str:
    """runc's state root for a namespace."""
    return os.path.join(state, "runc", namespace)


def read_exit(bundle: str) -> dict[str, Any] | None:
    """The recorded exit of the bundle's init ({"pid", "exit_status", "exited_at"}), if any."""
    text = read_small(os.path.join(bundle, EXIT_FILE))
    if not text:
        return None
    try:
        data = json.loads(text)
        return {
            "pid": int(data.get("pid", 0)),
            "exit_status": int(data["exit_status"]),
            "exited_at": float(data["exited_at"]),
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def write_exit(bundle: str, pid: int, exit_status: int, exited_at: float) -> None:
    """Record the init's exit in the bundle, atomically."""
    data = json.dumps({"pid": pid, "exit_status": exit_status, "exited_at": exited_at}).encode()
    write_atomic(os.path.join(bundle, EXIT_FILE), data)


def address_to_path(address: str) -> str:
    """The socket path of an `ipc://` address (as written in the bundle's address file)."""
    address = address.strip()
    return address[len("ipc://"):] if address.startswith("ipc://") else address


def exit_status_of(wait_status: int) -> int:
    """A waitpid status as a shell would report it: the code, or 128+signal when killed."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def runc_error(bundle: str, fallback: str) -> str:
    """The last error runc logged in the bundle (json log), else `fallback`."""
    text = read_small(os.path.join(bundle, RUNC_LOG_FILE)) or ""
    message = ""
    for line in text.splitlines()[-20:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message or fallback.strip() or "runtime failed"


# -- configuration -------------------------------------------------------------------


@dataclass
class ShimConfig:
    """Everything a shim needs to know, handed over by the runtime actor."""

    namespace: str
    container_id: str
    state: str
    runtime: str
    ipc_dir: str
    debug: bool = False

    @property
    def bundle(self) -> str:
        """The task's bundle directory."""
        return bundle_path(self.state, self.namespace, self.container_id)

    @property
    def socket_path(self) -> str:
        """Where the shim binds."""
        return shim_socket_path(self.state, self.namespace, self.container_id)

    @property
    def runtime_root(self) -> str:
        """runc --root for this namespace."""
        return runc_root(self.state, self.namespace)

    @property
    def title(self) -> str:
        """The process title, which also identifies a live shim in /proc/PID/cmdline."""
        return f"{TITLE_PREFIX}{self.namespace}/{self.container_id}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the zygote's pipe."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShimConfig":
        """Rebuild from `to_dict` output; unknown or missing keys are refused."""
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidArgument(f"bad shim config: {exc}") from None


_DEFERRED = object()


@dataclass
class _Waiter:
    identity: bytes
    request_id: str


class Shim:
    """The shim's state machine and its single-threaded serving loop."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.bundle = config.bundle
        self.rootfs = os.path.join(self.bundle, ROOTFS_DIR)
        self.status = "unknown"  # created -> running -> stopped
        self.pid = 0
        self.exit_status = 0
        self.exited_at = 0.0
        self.stdio = ("", "", "")
        self.terminal = False
        self.mounted = False
        self.done = False
        self._waiters: list[_Waiter] = []
        self._context: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._wake_r = -1
        self._events: Any = None
        self._handlers: dict[str, Callable[[Any], Any]] = {
            "shim.create": self.create,
            "shim.start": self.start,
            "shim.state": self.state,
            "shim.wait": self.wait,
            "shim.kill": self.kill,
            "shim.delete": self.delete,
        }

    # -- setup ----------------------------------------------------------------------

    def bind(self) -> None:
        """Become the container's subreaper, bind the endpoint, and write address and pid files."""
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        import faulthandler

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stack dump into shim.log
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._wake_r = wake_r
        path = self.config.socket_path
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a dead shim of the same task
        self._context = zmq.Context(io_threads=1)
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.MAXMSGSIZE, codec.SOCKET_MAX_MESSAGE_BYTES)
        old_umask = os.umask(0o177)
        try:
            router.bind(f"ipc://{path}")
        finally:
            os.umask(old_umask)
        self._router = router
        # Connected now, not at the exit: a PUB drops what it sends before the
        # exchange's subscriptions have reached it.
        from moord.bus.events import EventPublisher

        self._events = EventPublisher(self.config.ipc_dir, context=self._context)
        write_atomic(os.path.join(self.bundle, ADDRESS_FILE), f"ipc://{path}".encode())
        write_atomic(os.path.join(self.bundle, SHIM_PID_FILE), str(os.getpid()).encode())

    def _publish(self, topic: str, event: Message) -> None:
        # Events are best effort: the exchange may be restarting, the exit file stays.
        try:
            self._events.publish(topic, self.config.namespace, event)
        except Exception:
            log.exception("could not publish %s", topic)

    # -- loop -----------------------------------------------------------------------

    def serve(self) -> None:
        """Serve requests and reap children until deleted (or orphaned by a removed bundle)."""
        assert self._router is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_check = time.monotonic()
        while not self.done:
            ready = dict(poller.poll(int(IDLE_CHECK_SECONDS * 1000)))
            if self._wake_r in ready:
                self._drain_wakeups()
            self._reap()
            if self._router in ready:
                self._drain_requests()
            if time.monotonic() - last_check >= IDLE_CHECK_SECONDS:
                last_check = time.monotonic()
                if not os.path.isdir(self.bundle):
                    log.warning("bundle %s is gone: cleaning up and exiting", self.bundle)
                    self._teardown(force=True)
                    self.done = True
        self._close()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid and self.status != "stopped":
                self._init_exited(exit_status_of(status))
            # Other pids are orphans re-parented to us (we are the subreaper): reaped, done.

    def _init_exited(self, exit_status: int) -> None:
        from moord.messages.events import TaskExit

        self.status = "stopped"
        self.exit_status = exit_status
        self.exited_at = time.time()
        try:
            write_exit(self.bundle, self.pid, exit_status, self.exited_at)
        except OSError:
            log.exception("could not record the exit in %s", self.bundle)
        log.info("init %d exited with %d", self.pid, exit_status)
        self._publish(
            "/tasks/exit",
            TaskExit(
                container_id=self.config.container_id,
                id=self.config.container_id,
                pid=self.pid,
                exit_status=exit_status,
                exited_at=self.exited_at,
            ),
        )
        reply = WaitReply(exit_status=exit_status, exited_at=self.exited_at).model_dump()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._send(waiter.identity, waiter.request_id, reply)

    def _drain_requests(self) -> None:
        assert self._router is not None
        for _ in range(64):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, frames = parts[0], parts[1:]
            request_id = ""
            try:
                if not frames:
                    raise InvalidArgument("empty request")
                raw = codec.unpack(frames[0])
                if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                    request_id = raw["id"]
                envelope = validate_payload(_ENVELOPE_SPEC, raw if isinstance(raw, dict) else {})
                assert isinstance(envelope, Envelope)
                envelope.check_version()
                if envelope.deadline and time.time() > envelope.deadline:
                    raise DeadlineExceeded(f"{envelope.kind}: deadline passed before it arrived")
                handler = self._handlers.get(envelope.kind)
                spec = KINDS.get(envelope.kind)
                if handler is None or spec is None:
                    raise Unimplemented(f"the shim does not serve {envelope.kind[:128]!r}")
                request = validate_payload(spec, envelope.payload)
                log.debug("%s %s", envelope.kind, request_id)
                if envelope.kind == "shim.wait" and self.status != "stopped":
                    self._waiters.append(_Waiter(identity, request_id))
                    continue
                result = handler(request)
                self._send(identity, request_id, result.model_dump())
            except MoordError as exc:
                self._send(identity, request_id, exc.to_wire(), True)
            except Exception as exc:  # one bad request must not kill the shim
                log.exception("request failed")
                self._send(identity, request_id, Internal(f"{type(exc).__name__}: {exc}").to_wire(), True)
            if self.done:
                return

    def _send(self, identity: bytes, request_id: str, payload: Any, is_error: bool = False) -> None:
        assert self._router is not None
        try:
            self._router.send_multipart([identity, codec.reply_frame(request_id, payload, is_error)])
        except zmq.ZMQError:
            log.debug("caller went away before its reply")

    def _close(self) -> None:
        if self._router is not None:
            self._router.close(linger=1000)  # flush the delete reply
        if self._events is not None:
            self._events.close()
        path = self.config.socket_path
        try:
            os.unlink(path)
        except OSError:
            pass
        if self._context is not None:
            self._context.term()

    # -- runc -----------------------------------------------------------------------

    def _runc(self, *args: str, stdio: tuple[int, int, int] | None = None) -> subprocess.CompletedProcess[bytes]:
        cmd = [self.config.runtime, "--root", self.config.runtime_root]
        if os.path.isdir(self.bundle):
            cmd += ["--log", os.path.join(self.bundle, RUNC_LOG_FILE), "--log-format", "json"]
        cmd += args
        if stdio is None:
            return subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUNC_TIMEOUT
            )
        # runc's own messages go to its json log; the container's stdio are the FIFOs.
        return subprocess.run(cmd, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], timeout=RUNC_TIMEOUT)

    def _runc_failed(self, what: str, result: subprocess.CompletedProcess[bytes]) -> str:
        fallback = (result.stderr or b"").decode(errors="replace") if result.stderr else f"exit {result.returncode}"
        return f"{what}: {runc_error(self.bundle, fallback)}"

    # -- handlers ---------------------------------------------------------------------

    def create(self, request: ShimCreate) -> PidReply:
        """Mount the rootfs, open stdio and `runc create` the container."""
        if self.status != "unknown":
            raise AlreadyExists(f"task {self.config.container_id} is already created")
        if request.terminal:
            raise Unimplemented("terminal tasks need a console socket: not supported yet")
        if request.rootfs:
            from moord.linux.mount import mount_all

            os.makedirs(self.rootfs, mode=0o711, exist_ok=True)
            mount_all(request.rootfs, self.rootfs)
            self.mounted = True
        fds: list[int] = []
        try:
            fds = [
                _open_stdio(request.stdin, os.O_RDONLY),
                _open_stdio(request.stdout, os.O_WRONLY),
                _open_stdio(request.stderr, os.O_WRONLY),
            ]
            pid_file = os.path.join(self.bundle, INIT_PID_FILE)
            result = self._runc(
                "create", "--bundle", self.bundle, "--pid-file", pid_file, self.config.container_id,
                stdio=(fds[0], fds[1], fds[2]),
            )
            if result.returncode != 0:
                raise Internal(self._runc_failed("runc create", result))
            self.pid = int((read_small(pid_file) or "0").strip() or 0)
            if self.pid <= 0:
                raise Internal("runc create wrote no init pid")
        except BaseException:
            self._teardown(force=True)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self.status = "created"
        self.stdio = (request.stdin, request.stdout, request.stderr)
        self.terminal = request.terminal
        return PidReply(pid=self.pid)

    def start(self, request: ShimStart) -> PidReply:
        """`runc start`: run the user's process."""
        if self.status != "created":
            raise FailedPrecondition(f"task {self.config.container_id} is {self.status}, not created")
        result = self._runc("start", self.config.container_id)
        if result.returncode != 0:
            raise Internal(self._runc_failed("runc start", result))
        if self.status == "created":
            self.status = "running"
        return PidReply(pid=self.pid)

    def state(self, request: ShimState | None = None) -> ProcessReply:
        """The task's state."""
        return ProcessReply(
            process=Process(
                container_id=self.config.container_id,
                id=self.config.container_id,
                pid=self.pid,
                status=self.status,  # type: ignore[arg-type]
                stdin=self.stdio[0],
                stdout=self.stdio[1],
                stderr=self.stdio[2],
                terminal=self.terminal,
                exit_status=self.exit_status,
                exited_at=self.exited_at,
            )
        )

    def wait(self, request: ShimWait) -> WaitReply:
        """The exit (the loop parks waits that arrive before it)."""
        return WaitReply(exit_status=self.exit_status, exited_at=self.exited_at)

    def kill(self, request: ShimKill) -> Message:
        """`runc kill` the init (or every process with all=True)."""
        from moord.messages.base import Empty

        if self.status == "unknown":
            raise NotFound(f"task {self.config.container_id} is not created")
        if self.status == "stopped" and not request.all:
            raise NotFound(f"process {self.pid} already finished")
        args = ["kill"] + (["--all"] if request.all else []) + [self.config.container_id, str(request.signal)]
        result = self._runc(*args)
        if result.returncode != 0:
            self._reap()
            if self.status == "stopped":
                raise NotFound(f"process {self.pid} already finished")
            raise Internal(self._runc_failed("runc kill", result))
        return Empty()

    def delete(self, request: ShimDelete) -> DeleteTaskReply:
        """`runc delete`, unmount the rootfs, answer, then exit."""
        if self.status == "running":
            raise FailedPrecondition(f"task {self.config.container_id} must be stopped before deletion")
        self._teardown(force=self.status == "created")
        self.done = True
        return DeleteTaskReply(
            id=self.config.container_id, pid=self.pid, exit_status=self.exit_status, exited_at=self.exited_at
        )

    def _teardown(self, force: bool) -> None:
        """Remove runc's container and unmount the rootfs; safe to repeat."""
        result = self._runc("delete", *(["--force"] if force else []), self.config.container_id)
        if result.returncode != 0 and b"not exist" not in (result.stderr or b"") + _tail(self.bundle):
            log.warning("%s", self._runc_failed("runc delete", result))
        self._await_init(2.0)
        from moord.linux.mount import is_mountpoint, unmount_all

        if self.mounted or is_mountpoint(self.rootfs):
            unmount_all(self.rootfs)
            self.mounted = False

    def _await_init(self, seconds: float) -> None:
        """After a forced delete, collect the killed init's status (briefly)."""
        if self.pid <= 0 or self.status == "stopped":
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.status != "stopped":
            self._reap()
            if self.status != "stopped":
                time.sleep(0.01)


def _tail(bundle: str) -> bytes:
    return (read_small(os.path.join(bundle, RUNC_LOG_FILE)) or "")[-2000:].encode()


def _open_stdio(path: str, mode: int) -> int:
    """Open one stdio end for the container: a FIFO path, or /dev/null when empty."""
    if not path:
        return os.open(os.devnull, mode | os.O_CLOEXEC)
    if not os.path.isabs(path):
        raise InvalidArgument(f"stdio path {path!r} must be absolute")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"stdio FIFO {path} does not exist") from None
    # Only FIFOs: opening an arbitrary host file or device as root could harm the host.
    if not stat.S_ISFIFO(info.st_mode):
        raise InvalidArgument(f"stdio path {path} is not a FIFO")
    try:
        fd = os.open(path, mode | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise FailedPrecondition(f"nobody reads the FIFO {path}: open its read end first") from None
        raise InvalidArgument(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"stdio path {path} is not a FIFO")
    # The container expects ordinary blocking stdio.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd


_ENVELOPE_SPEC = KindSpec("envelope", Envelope, Envelope)


def run_shim(config: ShimConfig, ready_fd: int) -> None:
    """Become the shim (in an already detached process): bind, report ready on `ready_fd`, serve."""
    try:
        from setproctitle import setproctitle

        logging.basicConfig(
            level=logging.DEBUG if config.debug else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )

        setproctitle(config.title)
        shim = Shim(config)
        shim.bind()
    except BaseException as exc:
        os.write(ready_fd, f"!{type(exc).__name__}: {exc}".encode()[:4000])
        os.close(ready_fd)
        raise
    os.write(ready_fd, f"{os.getpid()}\n".encode())
    os.close(ready_fd)
    shim.serve()
