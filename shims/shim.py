"""moord-shim: one process per container, detached from the daemon, owning runc for it.

The shim is the parent of the container's init and of its exec'd processes (child
subreaper), so it alone can learn their exit statuses. It is single-threaded: one loop
polls its ROUTER endpoint, a signal wakeup pipe (SIGCHLD), the OOM eventfd and the fds
of its copy loops. runc runs synchronously through subprocess, and exits are reaped only
in the loop (waitpid(-1, WNOHANG)), never while a runc child is outstanding, so a reap
can never steal runc's own exit status.

Bundle layout (containerd's runtime v2 layout, plus our files):
  <state>/io.containerd.runtime.v2.task/<ns>/<id>/
    config.json  the OCI spec            rootfs/   mount point of the container's rootfs
    address      the shim's ipc address  shim.pid  the shim's pid
    init.pid     the container init's    exit      {"pid","exit_status","exited_at"}
    log.json     runc's log (json)       shim.log  the shim's own stderr
    runtime      the OCI runtime binary (runc or crun)

stdio: FIFOs are passed through (the shim opens them and hands them to runc as the
process's fds 0-2, then closes its copies), which costs nothing per byte. Copy loops run
only where they must: a `file://` log URI (a pipe to the file) and a terminal (the pty
master, received over runc's console socket, to and from the FIFOs). An exit is
announced once its process's output is flushed (or after IO_FLUSH_SECONDS).

crun 1.8.1 refuses a hybrid cgroup layout, so a crun shim first moves to a private mount
namespace and unmounts /sys/fs/cgroup/unified there (the v1 controllers stay).
"""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import zmq

from moord.linux.files import read_small, write_atomic
from moord.linux.process import PR_SET_CHILD_SUBREAPER, prctl
from moord.messages import envelope as codec
from moord.messages.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MoordError,
    NotFound,
    Unimplemented,
)
from moord.shims import wire
from moord.shims.wire import Request

Reply = dict[str, Any]  # a reply payload, as the models in messages/tasks.py dump it
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
RUNTIME_FILE = "runtime"
CRIU_WORK_DIR = "criu-work"  # runc checkpoint/restore's default --work-path, removed after
CRIU_DUMP_LOG = "criu-dump.log"  # kept in the bundle when a checkpoint fails
CRIU_RESTORE_LOG = "criu-restore.log"  # kept in the bundle when a restore fails
EXEC_FILE_PREFIX = "exec-"  # exec-<id>.json / exec-<id>.pid, removed once runc has read them
TITLE_PREFIX = "moord-shim: "
FILE_URI = "file://"
# How often the idle loop checks that its bundle still exists (a removed bundle means
# nobody will ever delete us: clean up and exit rather than leak).
IDLE_CHECK_SECONDS = 2.0
RUNC_TIMEOUT = 60.0
# After a process exits, how long its output may still drain before the exit is
# announced anyway (a daemonised grandchild can hold the pipe open for ever).
IO_FLUSH_SECONDS = 2.0
CONSOLE_TIMEOUT = 10.0
COPY_CHUNK = 65536
COPY_BUFFER_LIMIT = 1 << 20  # stop reading a source while this much waits for a slow reader
KNOWN_RUNTIMES = ("runc", "crun")
CGROUP_UNIFIED = "/sys/fs/cgroup/unified"
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2


# -- the bundle on disk (shared with the runtime actor) ------------------------------


def bundle_path(state: str, namespace: str, container_id: str) -> str:
    """The bundle directory of a task."""
    return os.path.join(state, BUNDLES_DIR, namespace, container_id)


def shim_socket_path(state: str, namespace: str, container_id: str) -> str:
    """A short, fixed-length socket path (unix socket paths must stay under ~100 bytes)."""
    digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:32]
    return os.path.join(state, SOCKETS_DIR, f"{digest}.sock")


def runtime_name(binary: str) -> str:
    """Which OCI runtime a binary is ("runc" or "crun"); anything else is refused."""
    name = os.path.basename(binary)
    if name not in KNOWN_RUNTIMES or (os.sep in binary and not os.path.isabs(binary)):
        raise InvalidArgument(f"unsupported OCI runtime {binary!r}: want one of {', '.join(KNOWN_RUNTIMES)}")
    return name


def runtime_root(state: str, namespace: str, binary: str = "runc") -> str:
    """The OCI runtime's state root for a namespace (one per runtime: their formats differ)."""
    return os.path.join(state, runtime_name(binary), namespace)


def runc_root(state: str, namespace: str) -> str:
    """runc's state root for a namespace."""
    return runtime_root(state, namespace, "runc")


def runtime_command(binary: str, root: str, *args: str) -> list[str]:
    """The command line running the OCI runtime from a process outside its shim.

    crun needs the cgroup v2 mount out of sight on a hybrid host, which a multi-threaded
    process (the runtime actor) cannot arrange for itself: util-linux unshare does it.
    """
    command = [binary, "--root", root, *args]
    if runtime_name(binary) == "crun" and hybrid_cgroups():
        script = f"umount -l {CGROUP_UNIFIED} 2>/dev/null; exec \"$@\""
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *command]
    return command


def hybrid_cgroups() -> bool:
    """Whether this host mounts cgroup v1 controllers beside a v2 tree at /sys/fs/cgroup/unified."""
    return os.path.isdir(os.path.join(CGROUP_UNIFIED, "")) and os.path.ismount(CGROUP_UNIFIED)


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


def first_criu_error(text: str) -> str:
    """CRIU's first `Error (...)` line in a log or its stderr ("" if none), without the timestamp."""
    for line in text.splitlines():
        at = line.find("Error (")
        if at >= 0:
            return line[at:].strip()
    return ""


def _keep_criu_log(work: str, log_name: str, kept: str) -> str:
    """Copy CRIU's log out of its work dir (which may be removed) and return its first error."""
    text = read_small(os.path.join(work, log_name), limit=1 << 22) or ""
    if text:
        write_atomic(kept, text.encode(), 0o600, durable=False)
    return first_criu_error(text)


def spec_cgroups_path(bundle: str) -> str:
    """The cgroupsPath of the bundle's spec ("" if none)."""
    try:
        with open(os.path.join(bundle, CONFIG_FILE), "rb") as fh:
            spec = json.load(fh)
        path = spec.get("linux", {}).get("cgroupsPath", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return path if isinstance(path, str) else ""


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
        """--root of the OCI runtime for this namespace."""
        return runtime_root(self.state, self.namespace, self.runtime)

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


# -- copying bytes -----------------------------------------------------------------------


class Copier:
    """Moves bytes from a non-blocking source fd to a destination fd inside the poll loop.

    The destination is non-blocking too; up to COPY_BUFFER_LIMIT waits for a slow
    reader, then the source is no longer read (back-pressure reaches the container).
    A reader that went away (EPIPE) makes the copier discard, so the container never
    blocks on a dead client.
    """

    def __init__(self, src: int, dst: int, owns_src: bool = True, owns_dst: bool = True) -> None:
        self.src = src
        self.dst = dst
        self.owns_src = owns_src
        self.owns_dst = owns_dst
        self.buffer = bytearray()
        self.eof = False
        self.discard = False
        self.closed = False

    @property
    def done(self) -> bool:
        """The source ended and everything was written (or discarded)."""
        return self.closed or (self.eof and not self.buffer)

    def wants_read(self) -> bool:
        """Whether the loop should poll the source."""
        return not self.closed and not self.eof and len(self.buffer) < COPY_BUFFER_LIMIT

    def wants_write(self) -> bool:
        """Whether the loop should poll the destination."""
        return not self.closed and bool(self.buffer)

    def on_readable(self) -> None:
        """Read what the source has."""
        try:
            data = os.read(self.src, COPY_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: a pty master whose slave side closed
            if exc.errno not in (errno.EIO, errno.EBADF):
                log.warning("copy read: %s", exc)
            self.eof = True
            return
        if not data:
            self.eof = True
            return
        if not self.discard:
            self.buffer += data
            self.on_writable()

    def on_writable(self) -> None:
        """Write what is buffered."""
        while self.buffer:
            try:
                written = os.write(self.dst, self.buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
                    log.warning("copy write: %s", exc)
                self.buffer.clear()
                self.discard = True
                return
            del self.buffer[:written]

    def close(self) -> None:
        """Close the fds this copier owns."""
        if self.closed:
            return
        self.closed = True
        for fd, owned in ((self.src, self.owns_src), (self.dst, self.owns_dst)):
            if owned and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _set_blocking(fd: int, blocking: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (flags & ~os.O_NONBLOCK) if blocking else (flags | os.O_NONBLOCK))


def _open_stdio(path: str, mode: int, blocking: bool = True) -> int:
    """Open one stdio end for a process: a FIFO path, or /dev/null when empty."""
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
    if blocking:  # a container expects ordinary blocking stdio
        _set_blocking(fd, True)
    return fd


def _open_log_file(uri: str) -> int:
    """Open (append, create) the file of a `file:///abs/path` log URI."""
    path = uri[len(FILE_URI):]
    if not path.startswith("/") or "\0" in path or any(p == ".." for p in path.split("/")):
        raise InvalidArgument(f"log URI {uri!r} must be file:// followed by an absolute path")
    os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise InvalidArgument(f"cannot open log file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"log file {path} is not a regular file")
    return fd


def _validate_stdio(stdin: str, stdout: str, stderr: str) -> None:
    if stdin.startswith(FILE_URI):
        raise InvalidArgument("stdin cannot be a file:// log URI")
    for value in (stdout, stderr):
        if "://" in value and not value.startswith(FILE_URI):
            raise Unimplemented(f"log URI {value[:64]!r}: only file:// is supported")


class _Stdio:
    """The fds a runc create/exec gets, and the copy loops feeding or draining them."""

    def __init__(self) -> None:
        self.child: list[int] = []  # fds 0-2 for runc (closed here once runc has them)
        self.copiers: list[Copier] = []
        self.stdin_copier: Copier | None = None
        self._opened: list[int] = []
        # Read ends of output FIFOs the shim holds, as containerd's shim does: with the
        # client gone, the container's writes wait in the pipe (and a later attach reads
        # them) instead of failing with EPIPE.
        self._keep_readers: list[int] = []

    def _own(self, fd: int) -> int:
        self._opened.append(fd)
        return fd

    def child_fds(self) -> tuple[int, int, int]:
        """fds 0, 1, 2 for runc."""
        return self.child[0], self.child[1], self.child[2]

    @classmethod
    def plain(cls, stdin: str, stdout: str, stderr: str) -> "_Stdio":
        """No terminal: FIFOs pass through; a file:// URI gets a pipe copied into the file."""
        io = cls()
        try:
            io.child.append(io._own(_open_stdio(stdin, os.O_RDONLY)))
            pipes: dict[str, int] = {}  # one pipe per log file: stdout and stderr may share it
            for target in (stdout, stderr):
                if target.startswith(FILE_URI):
                    if target not in pipes:
                        read_end, write_end = os.pipe2(os.O_CLOEXEC)
                        io._own(write_end)
                        _set_blocking(read_end, False)
                        io.copiers.append(Copier(read_end, _open_log_file(target)))
                        pipes[target] = write_end
                    io.child.append(pipes[target])
                else:
                    if target:
                        io._keep_readers.append(_open_stdio(target, os.O_RDONLY, blocking=False))
                    io.child.append(io._own(_open_stdio(target, os.O_WRONLY)))
        except BaseException:
            io.close_all()
            raise
        return io

    @classmethod
    def terminal(cls, master: int, stdin: str, stdout: str) -> "_Stdio":
        """A terminal: pty master -> stdout (FIFO, file or nowhere), stdin FIFO -> master."""
        io = cls()
        try:
            if stdout.startswith(FILE_URI):
                out = _open_log_file(stdout)
            elif stdout:
                # Read-write: the shim stays a reader, so output waits for a later attach
                # instead of being dropped once the first client has gone.
                out = _open_stdio(stdout, os.O_RDWR, blocking=False)
            else:
                out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            _set_blocking(master, False)
            # The master is shared by both copiers and closed with the process.
            io.copiers.append(Copier(master, out, owns_src=False))
            if stdin:
                # Read-write, as containerd does: a FIFO without writers would read EOF at once.
                source = _open_stdio(stdin, os.O_RDWR, blocking=False)
                io.stdin_copier = Copier(source, master, owns_dst=False)
        except BaseException:
            io.close_all()
            raise
        return io

    def release_child_fds(self) -> None:
        """Close our copies of the fds runc got (so a pipe's reader sees EOF at the exit)."""
        for fd in self._opened:
            try:
                os.close(fd)
            except OSError:
                pass
        self._opened.clear()
        self.child.clear()

    def close_all(self) -> None:
        """Close everything (on failure, or when the process is gone)."""
        self.release_child_fds()
        for fd in self._keep_readers:
            try:
                os.close(fd)
            except OSError:
                pass
        self._keep_readers.clear()
        for copier in self.copiers:
            copier.close()
        if self.stdin_copier is not None:
            self.stdin_copier.close()


# -- processes -----------------------------------------------------------------------


@dataclass
class _Waiter:
    identity: bytes
    request_id: str


@dataclass
class _Proc:
    """The init (exec_id "") or one exec'd process."""

    exec_id: str
    status: str = "unknown"  # created -> running (-> paused, init only) -> stopped
    pid: int = 0
    stdio: tuple[str, str, str] = ("", "", "")
    terminal: bool = False
    spec: dict[str, Any] | None = None  # an exec's OCI process
    exit_status: int = 0
    exited_at: float = 0.0
    reaped: bool = False  # waitpid has returned; the exit is announced once output is flushed
    flush_deadline: float = 0.0
    console: int = -1  # pty master
    io: _Stdio | None = None
    waiters: list[_Waiter] = field(default_factory=list)

    def copiers(self) -> list[Copier]:
        """The live copy loops of this process."""
        if self.io is None:
            return []
        extra = [self.io.stdin_copier] if self.io.stdin_copier is not None else []
        return [c for c in self.io.copiers + extra if not c.closed]

    def output_flushed(self) -> bool:
        """Whether every output copier has reached the end of its source."""
        return self.io is None or all(c.done for c in self.io.copiers)

    def close_io(self) -> None:
        """Close copy loops and the console."""
        if self.io is not None:
            self.io.close_all()
            self.io = None
        if self.console >= 0:
            os.close(self.console)
            self.console = -1


class Shim:
    """The shim's state machine and its single-threaded serving loop."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.bundle = config.bundle
        self.rootfs = os.path.join(self.bundle, ROOTFS_DIR)
        self.init = _Proc("")
        self.execs: dict[str, _Proc] = {}
        self.mounted = False
        self.done = False
        self.cgroups_path = ""
        self.restore_from = ""  # a CRIU image shim.start restores the init from (shim.create's checkpoint)
        self._oom: Any = None
        self._trim_pending = False
        self._oom_pending = False
        self._context: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._wake_r = -1
        self._events: Any = None
        self._handlers: dict[str, Callable[[Request], Reply]] = {
            "shim.create": self.create,
            "shim.start": self.start,
            "shim.state": self.state,
            "shim.wait": self.wait,
            "shim.kill": self.kill,
            "shim.delete": self.delete,
            "shim.exec": self.exec,
            "shim.pids": self.pids,
            "shim.pause": self.pause,
            "shim.resume": self.resume,
            "shim.update": self.update,
            "shim.resize_pty": self.resize_pty,
            "shim.close_io": self.close_io,
            "shim.checkpoint": self.checkpoint,
        }

    # The init's state, under the names the first shim used.
    @property
    def status(self) -> str:
        """The init's status."""
        return self.init.status

    @property
    def pid(self) -> int:
        """The init's pid."""
        return self.init.pid

    # -- setup ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Become the container's subreaper and catch SIGCHLD (before any runc runs)."""
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        if runtime_name(self.config.runtime) == "crun" and hybrid_cgroups():
            hide_cgroup_v2()  # before any thread exists: unshare(CLONE_NEWNS) needs that
        import faulthandler

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stack dump into shim.log
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._wake_r = wake_r
        # The sockets dir holds runc's console sockets too, which runc create may need first.
        os.makedirs(os.path.dirname(self.config.socket_path), mode=0o700, exist_ok=True)

    @property
    def bound(self) -> bool:
        """Whether the endpoint is bound."""
        return self._router is not None

    def bind(self) -> None:
        """Bind the endpoint, connect the event publisher, write the address and pid files."""
        path = self.config.socket_path
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

    def _publish(self, topic: str, event: dict[str, Any]) -> None:
        # Events are best effort: the exchange may be restarting, the exit file stays.
        try:
            self._events.publish(topic, self.config.namespace, event)
        except Exception:
            log.exception("could not publish %s", topic)

    # -- loop -----------------------------------------------------------------------

    def _processes(self) -> list[_Proc]:
        return [self.init, *self.execs.values()]

    def serve(self) -> None:
        """Serve requests, copy I/O and reap children until deleted (or orphaned by a removed bundle)."""
        assert self._router is not None
        last_check = time.monotonic()
        while not self.done:
            poller = zmq.Poller()
            poller.register(self._router, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            if self._oom is not None:
                poller.register(self._oom.fd, zmq.POLLIN)
            copiers = [c for p in self._processes() for c in p.copiers()]
            interest: dict[int, int] = {}
            for copier in copiers:
                if copier.wants_read():
                    interest[copier.src] = interest.get(copier.src, 0) | zmq.POLLIN
                if copier.wants_write():
                    interest[copier.dst] = interest.get(copier.dst, 0) | zmq.POLLOUT
            for fd, flags in interest.items():
                poller.register(fd, flags)
            timeout = IDLE_CHECK_SECONDS
            pending = [p.flush_deadline for p in self._processes() if p.reaped and p.status != "stopped"]
            if pending:
                timeout = max(0.0, min(timeout, min(pending) - time.monotonic()))
            ready = dict(poller.poll(int(timeout * 1000)))
            if self._wake_r in ready:
                self._drain_wakeups()
            for copier in copiers:
                if copier.wants_read() and copier.src in ready:
                    copier.on_readable()
                if copier.dst in ready and ready[copier.dst] & (zmq.POLLOUT | zmq.POLLERR) and copier.wants_write():
                    copier.on_writable()
            self._reap()
            self._settle()
            if self._oom is not None and self._oom.fd in ready:
                self._check_oom()
            if self._router in ready:
                self._drain_requests()
                self._trim_pending = True
            elif not ready and self._trim_pending:
                self._trim_memory()
            if time.monotonic() - last_check >= IDLE_CHECK_SECONDS:
                last_check = time.monotonic()
                if not os.path.isdir(self.bundle):
                    log.warning("bundle %s is gone: cleaning up and exiting", self.bundle)
                    self._teardown(force=True)
                    self.done = True
        self._close()

    def _trim_memory(self) -> None:
        """Once idle after requests: collect, and hand freed heap pages back to the kernel.

        runc runs and request decoding leave freed but resident malloc pages behind;
        a shim idles for the container's lifetime, so they would be paid per container.
        """
        self._trim_pending = False
        gc.collect()
        from moord.linux.libc import libc

        libc.malloc_trim(0)

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
            for proc in self._processes():
                if proc.pid == pid and not proc.reaped:
                    proc.reaped = True
                    proc.exit_status = exit_status_of(status)
                    proc.exited_at = time.time()
                    proc.flush_deadline = time.monotonic() + IO_FLUSH_SECONDS
                    break
            # Other pids are orphans re-parented to us (we are the subreaper): reaped, done.

    def _settle(self, force: bool = False) -> None:
        """Announce exits whose output has been flushed (all of them when forced)."""
        now = time.monotonic()
        # Exec'd processes first, as containerd does: the init's exit ends the task.
        for proc in [*self.execs.values(), self.init]:
            if proc.reaped and proc.status != "stopped":
                if force or proc.output_flushed() or now >= proc.flush_deadline:
                    self._exited(proc)

    def _exited(self, proc: _Proc) -> None:
        if proc.io is not None:
            for copier in proc.io.copiers:
                copier.on_writable()  # last bytes, if the reader takes them
        proc.close_io()
        proc.status = "stopped"
        if not proc.exec_id:
            try:
                write_exit(self.bundle, proc.pid, proc.exit_status, proc.exited_at)
            except OSError:
                log.exception("could not record the exit in %s", self.bundle)
            if self._oom is not None:
                self._check_oom()  # an OOM kill's notification may still be queued
        log.info("%s %d exited with %d", proc.exec_id or "init", proc.pid, proc.exit_status)
        self._publish(
            "/tasks/exit",
            {  # messages.events.TaskExit
                "container_id": self.config.container_id,
                "id": proc.exec_id or self.config.container_id,
                "pid": proc.pid,
                "exit_status": proc.exit_status,
                "exited_at": proc.exited_at,
            },
        )
        reply = {"exit_status": proc.exit_status, "exited_at": proc.exited_at}  # WaitReply
        waiters, proc.waiters = proc.waiters, []
        for waiter in waiters:
            self._send(waiter.identity, waiter.request_id, reply)

    def _check_oom(self) -> None:
        if self._oom.fired():
            log.info("OOM kill in %s", self.cgroups_path)
            self._publish("/tasks/oom", {"container_id": self.config.container_id})  # TaskOOM
        elif self._oom.gone():
            self._oom.close()
            self._oom = None

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
                if len(frames) != 1:
                    raise InvalidArgument("a shim request is one frame")
                request = wire.decode(frames[0], self._handlers)
                request_id = request.request_id
                log.debug("%s %s", request.kind, request_id)
                if request.kind == "shim.wait":
                    proc = self._proc(request.exec_id)
                    if proc.status != "stopped":
                        proc.waiters.append(_Waiter(identity, request_id))
                        continue
                result = self._handlers[request.kind](request)
                self._send(identity, request_id, result)
                self.after_reply()
            except MoordError as exc:
                self._send(identity, request_id or wire.request_id_of(exc), exc.to_wire(), True)
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
        for proc in self._processes():
            proc.close_io()
        if self._oom is not None:
            self._oom.close()
            self._oom = None
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

    def _runc(
        self,
        *args: str,
        stdio: tuple[int, int, int] | None = None,
        input_data: bytes | None = None,
        during: Callable[[], None] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = [self.config.runtime, "--root", self.config.runtime_root]
        if os.path.isdir(self.bundle):
            cmd += ["--log", os.path.join(self.bundle, RUNC_LOG_FILE), "--log-format", "json"]
        cmd += args
        if stdio is None:
            return subprocess.run(
                cmd,
                input=input_data,
                stdin=None if input_data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=RUNC_TIMEOUT,
            )
        # runc's own messages go to its json log; the process's stdio are ours to give.
        if during is None:
            return subprocess.run(cmd, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], timeout=RUNC_TIMEOUT)
        # `during` (the shim's bind) runs while runc works; runc is waited for even when it fails.
        with subprocess.Popen(cmd, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2]) as child:
            try:
                during()
            finally:
                try:
                    returncode = child.wait(RUNC_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                    raise
        return subprocess.CompletedProcess(cmd, returncode)

    def _runc_failed(self, what: str, result: subprocess.CompletedProcess[bytes]) -> str:
        fallback = (result.stderr or b"").decode(errors="replace") if result.stderr else f"exit {result.returncode}"
        return f"{what}: {runc_error(self.bundle, fallback)}"

    def _console_socket(self, name: str) -> tuple[socket.socket, str]:
        """A listening unix socket runc sends the pty master to (short path under the sockets dir)."""
        path = self.config.socket_path[: -len(".sock")] + f"-{name}.console"
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(1)
        return listener, path

    @staticmethod
    def _receive_console(listener: socket.socket, path: str) -> int:
        """The pty master runc sent (SCM_RIGHTS); runc has already exited, so it is queued."""
        listener.settimeout(CONSOLE_TIMEOUT)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(CONSOLE_TIMEOUT)
                _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        except OSError as exc:
            raise Internal(f"no terminal from the runtime: {exc}") from None
        finally:
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass
        if not fds:
            raise Internal("the runtime sent no terminal")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def _run_with_stdio(
        self, proc: _Proc, args: list[str], name: str, during: Callable[[], None] | None = None
    ) -> None:
        """runc create/exec with the process's stdio wired; sets proc.io and proc.console.
        `during` runs while runc does (once its stdio are set up)."""
        stdin, stdout, stderr = proc.stdio
        _validate_stdio(stdin, stdout, stderr)
        listener: socket.socket | None = None
        console_path = ""
        io: _Stdio | None = None
        null = -1
        try:
            if proc.terminal:
                listener, console_path = self._console_socket(name)
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                stdio = (null, null, null)
                args = args[:1] + ["--console-socket", console_path] + args[1:]
            else:
                io = _Stdio.plain(stdin, stdout, stderr)
                stdio = io.child_fds()
            result = self._runc(*args, stdio=stdio, during=during)
            if io is not None:
                io.release_child_fds()
            if result.returncode != 0:
                raise Internal(self._runc_failed(f"{os.path.basename(self.config.runtime)} {args[0]}", result))
            if listener is not None:
                proc.console = self._receive_console(listener, console_path)
                listener = None
                io = _Stdio.terminal(proc.console, stdin, stdout)
            proc.io = io
        except BaseException:
            if io is not None:
                io.close_all()
            raise
        finally:
            if null >= 0:
                os.close(null)
            if listener is not None:
                listener.close()
                try:
                    os.unlink(console_path)
                except OSError:
                    pass

    # -- handlers ---------------------------------------------------------------------

    def _proc(self, exec_id: str) -> _Proc:
        if not exec_id:
            if self.init.status == "unknown":
                raise NotFound(f"task {self.config.container_id} is not created")
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"process {exec_id} does not exist in task {self.config.container_id}")
        return proc

    def create(self, request: Request, during: Callable[[], None] | None = None) -> Reply:
        """Mount the rootfs, wire stdio and `runc create` the container; `during` (a first
        create's bind) runs while runc does, or before the reply when runc does not run."""
        if self.init.status != "unknown":
            raise AlreadyExists(f"task {self.config.container_id} is already created")
        if request.rootfs:
            from moord.linux.mount import mount_all

            os.makedirs(self.rootfs, mode=0o711, exist_ok=True)
            mount_all(request.rootfs, self.rootfs)
            self.mounted = True
        proc = self.init
        proc.stdio = (request.stdin, request.stdout, request.stderr)
        proc.terminal = request.terminal
        if request.checkpoint:
            # containerd's createdCheckpointState: nothing runs until start restores it.
            if not os.path.isabs(request.checkpoint) or not os.path.isdir(request.checkpoint):
                self._teardown(force=True)
                raise InvalidArgument(f"checkpoint {request.checkpoint!r} is not an absolute directory")
            self.restore_from = request.checkpoint
            proc.status = "created"
            if during is not None:
                during()
            return {"pid": 0}
        try:
            pid_file = os.path.join(self.bundle, INIT_PID_FILE)
            args = ["create", "--bundle", self.bundle, "--pid-file", pid_file, self.config.container_id]
            self._run_with_stdio(proc, args, "init", during)
            proc.pid = int((read_small(pid_file) or "0").strip() or 0)
            if proc.pid <= 0:
                raise Internal("runc create wrote no init pid")
        except BaseException:
            proc.close_io()
            self._teardown(force=True)
            raise
        proc.status = "created"
        # After the reply (reading the spec again costs a millisecond): the init cannot
        # run, let alone be OOM-killed, before shim.start, which comes after.
        self._oom_pending = True
        return {"pid": proc.pid}

    def after_reply(self) -> None:
        """Work a reply need not wait for: the OOM watch of a just-created task."""
        if self._oom_pending:
            self._oom_pending = False
            self._watch_oom()

    def _watch_oom(self) -> None:
        from moord.shims import cgroups

        self.cgroups_path = spec_cgroups_path(self.bundle)
        if not self.cgroups_path:
            return
        try:
            self._oom = cgroups.watch_oom(self.cgroups_path)
        except (OSError, ValueError) as exc:
            log.warning("no OOM notifications for %s: %s", self.cgroups_path, exc)

    def start(self, request: Request) -> Reply:
        """`runc start` (init) or `runc exec --detach` (an exec'd process)."""
        proc = self._proc(request.exec_id)
        if proc.status != "created":
            raise FailedPrecondition(f"process {request.exec_id or self.config.container_id} is {proc.status}, not created")
        if not proc.exec_id and self.restore_from:
            return self._restore(proc)
        if not proc.exec_id:
            result = self._runc("start", self.config.container_id)
            if result.returncode != 0:
                raise Internal(self._runc_failed("runc start", result))
            if proc.status == "created":
                proc.status = "running"
            return {"pid": proc.pid}
        if self.init.status not in ("running", "paused") or self.init.reaped:
            raise FailedPrecondition(f"task {self.config.container_id} is {self.init.status}: cannot exec")
        process_file = os.path.join(self.bundle, f"{EXEC_FILE_PREFIX}{proc.exec_id}.json")
        pid_file = os.path.join(self.bundle, f"{EXEC_FILE_PREFIX}{proc.exec_id}.pid")
        spec = dict(proc.spec or {})
        spec["terminal"] = proc.terminal  # runc insists the two agree
        try:
            write_atomic(process_file, json.dumps(spec).encode(), 0o600, durable=False)
            args = ["exec", "--process", process_file, "--detach", "--pid-file", pid_file, self.config.container_id]
            self._run_with_stdio(proc, args, f"exec-{proc.exec_id}")
            proc.pid = int((read_small(pid_file) or "0").strip() or 0)
            if proc.pid <= 0:
                raise Internal("runc exec wrote no pid")
        except BaseException:
            proc.close_io()
            raise
        finally:
            for path in (process_file, pid_file):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        proc.status = "running"
        return {"pid": proc.pid}

    def _restore(self, proc: _Proc) -> Reply:
        """`runc restore --detach` the init from the CRIU image shim.create named.

        We are the subreaper already, so runc need not be one (--no-subreaper): the
        restored init becomes our child and is reaped by the loop like a started one.
        """
        pid_file = os.path.join(self.bundle, INIT_PID_FILE)
        work = os.path.join(self.bundle, CRIU_WORK_DIR)
        os.makedirs(work, mode=0o700, exist_ok=True)
        args = [
            "restore", "--detach", "--no-subreaper", "--bundle", self.bundle, "--pid-file", pid_file,
            "--image-path", self.restore_from, "--work-path", work, self.config.container_id,
        ]  # fmt: skip
        try:
            self._run_with_stdio(proc, args, "init")
        except Internal as exc:
            kept = os.path.join(self.bundle, CRIU_RESTORE_LOG)
            criu = _keep_criu_log(work, "restore.log", kept)
            raise Internal(f"{exc.message}: {criu or 'see the CRIU log'} (criu log: {kept})") from None
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)
        proc.pid = int((read_small(pid_file) or "0").strip() or 0)
        if proc.pid <= 0:
            raise Internal("runc restore wrote no init pid")
        self.restore_from = ""
        if proc.status == "created":
            proc.status = "running"
        self._watch_oom()
        return {"pid": proc.pid}

    def checkpoint(self, request: Request) -> Reply:
        """`runc checkpoint` the running (or paused) container into request.path.

        Without `exit` the container keeps running (--leave-running); with it CRIU kills
        the tree after the dump and the loop reaps the init like any exit. A failure
        keeps CRIU's dump.log as criu-dump.log in the bundle and quotes its first error.
        """
        proc = self._proc("")
        if proc.status not in ("running", "paused") or proc.reaped:
            raise FailedPrecondition(f"cannot checkpoint task {self.config.container_id}: it is {proc.status}")
        if not os.path.isabs(request.path) or (request.work_path and not os.path.isabs(request.work_path)):
            raise InvalidArgument("checkpoint image and work paths must be absolute")
        work = request.work_path or os.path.join(self.bundle, CRIU_WORK_DIR)
        os.makedirs(request.path, mode=0o700, exist_ok=True)
        os.makedirs(work, mode=0o700, exist_ok=True)
        args = ["checkpoint", "--image-path", request.path, "--work-path", work]
        if not request.exit:
            args.append("--leave-running")
        for wanted, flag in (
            (request.open_tcp, "--tcp-established"),
            (request.external_unix_sockets, "--ext-unix-sk"),
            (request.terminal, "--shell-job"),
            (request.file_locks, "--file-locks"),
        ):
            if wanted:
                args.append(flag)
        for namespace in request.empty_namespaces:
            args += ["--empty-ns", namespace]
        args.append(self.config.container_id)
        try:
            result = self._runc(*args)
            if result.returncode != 0:
                kept = os.path.join(self.bundle, CRIU_DUMP_LOG)
                criu = _keep_criu_log(work, "dump.log", kept)
                failed = self._runc_failed(f"{os.path.basename(self.config.runtime)} checkpoint", result)
                raise Internal(f"{failed}: {criu or 'see the CRIU log'} (criu log: {kept})")
        finally:
            if not request.work_path:
                subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)
        return {}

    def _process(self, proc: _Proc) -> Reply:
        return {  # messages.tasks.Process
            "container_id": self.config.container_id,
            "id": proc.exec_id or self.config.container_id,
            "pid": proc.pid,
            "status": proc.status,
            "stdin": proc.stdio[0],
            "stdout": proc.stdio[1],
            "stderr": proc.stdio[2],
            "terminal": proc.terminal,
            "exit_status": proc.exit_status,
            "exited_at": proc.exited_at,
        }

    def state(self, request: Request | None = None) -> Reply:
        """The init's state and every exec'd process's."""
        return {"process": self._process(self.init), "execs": [self._process(p) for p in self.execs.values()]}

    def wait(self, request: Request) -> Reply:
        """The exit (the loop parks waits that arrive before it)."""
        proc = self._proc(request.exec_id)
        return {"exit_status": proc.exit_status, "exited_at": proc.exited_at}

    def kill(self, request: Request) -> Reply:
        """`runc kill` the init (or every process with all=True); kill(2) an exec'd process."""
        proc = self._proc(request.exec_id)
        if proc.exec_id:
            if proc.pid <= 0:
                raise FailedPrecondition(f"process {proc.exec_id} is not started")
            if proc.reaped:
                raise NotFound(f"process {proc.exec_id} already finished")
            # Safe from pid reuse: an unreaped child's pid stays ours.
            os.kill(proc.pid, request.signal)
            return {}
        if proc.reaped and not request.all:
            raise NotFound(f"process {proc.pid} already finished")
        args = ["kill"] + (["--all"] if request.all else []) + [self.config.container_id, str(request.signal)]
        result = self._runc(*args)
        if result.returncode != 0:
            self._reap()
            if proc.reaped:
                if request.all:
                    return {}
                raise NotFound(f"process {proc.pid} already finished")
            raise Internal(self._runc_failed("runc kill", result))
        return {}

    def delete(self, request: Request) -> Reply:
        """Init: `runc delete`, unmount the rootfs, answer, then exit. Exec: forget the process."""
        proc = self._proc(request.exec_id)
        if proc.exec_id:
            if proc.status == "running":
                raise FailedPrecondition(f"process {proc.exec_id} must be stopped before deletion")
            proc.close_io()
            del self.execs[proc.exec_id]
            return {"id": proc.exec_id, "pid": proc.pid, "exit_status": proc.exit_status, "exited_at": proc.exited_at}
        if proc.status in ("running", "paused"):
            raise FailedPrecondition(f"task {self.config.container_id} must be stopped before deletion")
        self._teardown(force=proc.status == "created")
        self.done = True
        return {"id": self.config.container_id, "pid": proc.pid, "exit_status": proc.exit_status, "exited_at": proc.exited_at}

    def exec(self, request: Request) -> Reply:
        """Record an exec'd process; `start` runs it."""
        if self.init.status not in ("running", "paused") or self.init.reaped:
            raise FailedPrecondition(f"task {self.config.container_id} is {self.init.status}: cannot exec")
        if request.exec_id in self.execs:
            raise AlreadyExists(f"process {request.exec_id} already exists")
        if not isinstance(request.spec.get("args"), list) or not request.spec["args"]:
            raise InvalidArgument("the exec process spec needs args")
        _validate_stdio(request.stdin, request.stdout, request.stderr)
        self.execs[request.exec_id] = _Proc(
            request.exec_id,
            status="created",
            stdio=(request.stdin, request.stdout, request.stderr),
            terminal=request.terminal,
            spec=request.spec,
        )
        return {}

    def pids(self, request: Request) -> Reply:
        """`runc ps`: the container's pids, each with the exec that started it."""
        self._proc("")
        result = self._runc("ps", "--format", "json", self.config.container_id)
        if result.returncode != 0:
            raise Internal(self._runc_failed("runc ps", result))
        try:
            pids = json.loads(result.stdout or b"[]") or []
        except ValueError:
            raise Internal("runc ps printed no JSON") from None
        by_pid = {p.pid: p.exec_id for p in self.execs.values() if p.pid}
        return {"processes": [{"pid": int(pid), "exec_id": by_pid.get(int(pid), "")} for pid in pids]}  # PidsReply

    def pause(self, request: Request) -> Reply:
        """`runc pause`: freeze the container."""
        if self._proc("").status != "running" or self.init.reaped:
            raise FailedPrecondition(f"task {self.config.container_id} is {self.init.status}, not running")
        result = self._runc("pause", self.config.container_id)
        if result.returncode != 0:
            raise Internal(self._runc_failed("runc pause", result))
        self.init.status = "paused"
        return {}

    def resume(self, request: Request) -> Reply:
        """`runc resume`: thaw the container."""
        if self._proc("").status != "paused":
            raise FailedPrecondition(f"task {self.config.container_id} is {self.init.status}, not paused")
        result = self._runc("resume", self.config.container_id)
        if result.returncode != 0:
            raise Internal(self._runc_failed("runc resume", result))
        self.init.status = "running"
        return {}

    def update(self, request: Request) -> Reply:
        """`runc update --resources -` with an OCI LinuxResources object."""
        if self._proc("").status not in ("created", "running", "paused"):
            raise FailedPrecondition(f"task {self.config.container_id} is {self.init.status}")
        data = json.dumps(request.resources).encode()
        result = self._runc("update", "--resources", "-", self.config.container_id, input_data=data)
        if result.returncode != 0:
            raise InvalidArgument(self._runc_failed("runc update", result))
        return {}

    def resize_pty(self, request: Request) -> Reply:
        """TIOCSWINSZ on the process's pty master."""
        import termios

        proc = self._proc(request.exec_id)
        if proc.console < 0:
            raise FailedPrecondition(f"process {request.exec_id or self.config.container_id} has no terminal")
        fcntl.ioctl(proc.console, termios.TIOCSWINSZ, struct.pack("HHHH", request.height, request.width, 0, 0))
        return {}

    def close_io(self, request: Request) -> Reply:
        """Stop feeding the process's terminal from its stdin FIFO (FIFO stdin: the client closes it)."""
        proc = self._proc(request.exec_id)
        if proc.io is not None and proc.io.stdin_copier is not None:
            proc.io.stdin_copier.close()
            proc.io.stdin_copier = None
            if proc.console >= 0:
                try:
                    os.write(proc.console, b"\x04")  # EOF for the line discipline, as a closed stdin
                except OSError:
                    pass
        return {}

    def _teardown(self, force: bool) -> None:
        """Remove runc's container and unmount the rootfs; safe to repeat."""
        result = self._runc("delete", *(["--force"] if force else []), self.config.container_id)
        if result.returncode != 0 and b"not exist" not in (result.stderr or b"") + _tail(self.bundle):
            log.warning("%s", self._runc_failed("runc delete", result))
        self._await_init(2.0)
        for proc in self._processes():
            proc.close_io()
        if self._oom is not None:
            self._oom.close()
            self._oom = None
        from moord.linux.mount import is_mountpoint, unmount_all

        if self.mounted or is_mountpoint(self.rootfs):
            unmount_all(self.rootfs)
            self.mounted = False

    def _await_init(self, seconds: float) -> None:
        """After a forced delete, collect the killed init's status (briefly)."""
        if self.init.pid <= 0 or self.init.status == "stopped":
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.init.reaped:
            self._reap()
            if not self.init.reaped:
                time.sleep(0.01)
        self._settle(force=True)


def hide_cgroup_v2() -> None:
    """Private mount namespace without /sys/fs/cgroup/unified (crun refuses hybrid hosts)."""
    import ctypes

    from moord.linux.libc import libc

    if libc.unshare(CLONE_NEWNS) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare(CLONE_NEWNS): {os.strerror(code)}")
    # Private, so neither our unmount nor the rootfs mount reaches the host.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"make-rprivate /: {os.strerror(code)}")
    if libc.umount2(CGROUP_UNIFIED.encode(), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            raise OSError(code, f"umount {CGROUP_UNIFIED}: {os.strerror(code)}")


def _tail(bundle: str) -> bytes:
    return (read_small(os.path.join(bundle, RUNC_LOG_FILE)) or "")[-2000:].encode()




def configure_logging() -> None:
    """The shim's log format, to stderr (the bundle's shim.log once detached)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_shim(config: ShimConfig, ready_fd: int, create: dict[str, Any] | None = None) -> None:
    """Become the shim (in an already detached process): bind, report ready on `ready_fd`, serve.

    With `create` (a shim.create payload) the shim creates its task first, binding while
    runc runs, and the ready report carries the create's reply or error: the runtime
    saves a round trip and the bind's cost. Report: "<pid>\n<json>" where the json is
    {} or {"create": reply} or {"error": wire error}; "!<message>" when the shim failed.
    """
    try:
        from setproctitle import setproctitle

        configure_logging()  # done already in a zygote (shared pages): then a no-op
        if config.debug:
            logging.getLogger().setLevel(logging.DEBUG)

        setproctitle(config.title)
        shim = Shim(config)
        shim.prepare()
        report: dict[str, Any] = {}
        if create is not None:
            try:
                report["create"] = shim.create(wire.decode_payload("shim.create", create), during=shim.bind)
            except MoordError as exc:
                report = {"error": exc.to_wire()}
            except Exception as exc:  # as the loop answers a request that failed unexpectedly
                log.exception("create failed")
                report = {"error": Internal(f"{type(exc).__name__}: {exc}").to_wire()}
        if not shim.bound:  # no create, or it failed before runc ran
            shim.bind()
    except BaseException as exc:
        os.write(ready_fd, f"!{type(exc).__name__}: {exc}".encode()[:4000])
        os.close(ready_fd)
        raise
    os.write(ready_fd, f"{os.getpid()}\n{json.dumps(report)}\n".encode())
    os.close(ready_fd)
    shim.after_reply()
    shim.serve()
