"""moorctl's interactive side: stdio FIFOs, the local terminal, and the relay between them.

The same calls as ctr's pkg/cio and console handling: the client makes the FIFOs (stdin,
stdout, and stderr unless there is a terminal) in a private dir under the daemon's fifo
root, opens its ends before Tasks.Create, then copies its own stdin into the stdin FIFO
and the output FIFOs to its stdout/stderr. With a terminal, the local terminal is put in
raw mode (restored on every way out) and its window size is sent to the task at start
and on every SIGWINCH. Stdin EOF closes the task's stdin (CloseIO), signals are passed
to the task, and the task's exit status comes back from a Wait made before Start.

Standard library only, and only what zmq loads anyway (moorctl's start-up time is measured):
no dataclasses (it imports inspect), shutil or secrets.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# Waiting for a process has no natural deadline; this bounds a lost reply.
WAIT_TIMEOUT = 7 * 24 * 3600.0
CHUNK = 65536
# Our stdin is no longer read while this much waits for the task to take it.
STDIN_BUFFER_LIMIT = 1 << 20
# After the exit, output is drained until the FIFOs end or stay quiet this long.
DRAIN_QUIET_SECONDS = 0.2
# Signals passed on to the task (ctr forwards all catchable ones; these are the useful ones).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class FifoSet:
    """A process's stdio FIFO paths ("" = none) and the client's open ends of them."""

    def __init__(self, stdin: str = "", stdout: str = "", stderr: str = "", directory: str = "") -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.directory = directory  # ours to remove, when we made it
        self.stdin_fd = -1
        self.stdout_fd = -1
        self.stderr_fd = -1

    def __repr__(self) -> str:
        return f"FifoSet(stdin={self.stdin!r}, stdout={self.stdout!r}, stderr={self.stderr!r}, directory={self.directory!r})"

    @classmethod
    def create(cls, root: str, name: str, stdin: bool = True, stderr: bool = True) -> "FifoSet":
        """Make FIFOs `<root>/<random>/<name>-{stdin,stdout,stderr}` and open our ends.

        Opened before the task exists: read ends non-blocking (they connect when the shim
        opens its side), the stdin end read-write so that opening never needs a reader.
        """
        os.makedirs(root, mode=0o700, exist_ok=True)
        directory = os.path.join(root, os.urandom(8).hex())
        os.mkdir(directory, 0o700)
        fifos = cls(directory=directory)
        try:
            fifos.stdout = _mkfifo(directory, f"{name}-stdout")
            if stdin:
                fifos.stdin = _mkfifo(directory, f"{name}-stdin")
            if stderr:
                fifos.stderr = _mkfifo(directory, f"{name}-stderr")
            fifos.open(stdin_mode=os.O_RDWR)
        except BaseException:
            fifos.close(remove=True)
            raise
        return fifos

    @classmethod
    def attach(cls, stdin: str, stdout: str, stderr: str) -> "FifoSet":
        """Open the FIFOs a running process was created with (`tasks attach`)."""
        fifos = cls(stdin=stdin, stdout=stdout, stderr=stderr)
        for path in (stdin, stdout, stderr):
            if path and "://" in path:
                raise ValueError(f"the process's stdio is {path}, not a FIFO: nothing to attach to")
            if path and not stat.S_ISFIFO(os.lstat(path).st_mode):
                raise ValueError(f"{path} is not a FIFO")
        if not (stdin or stdout or stderr):
            raise ValueError("the process has no stdio FIFOs: nothing to attach to")
        try:
            # Write-only: a stdin nobody reads any more (ENXIO) is simply not forwarded.
            fifos.open(stdin_mode=os.O_WRONLY)
        except BaseException:
            fifos.close()
            raise
        return fifos

    def open(self, stdin_mode: int) -> None:
        """Open our end of each FIFO, non-blocking."""
        flags = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
        if self.stdout:
            self.stdout_fd = os.open(self.stdout, os.O_RDONLY | flags)
        if self.stderr:
            self.stderr_fd = os.open(self.stderr, os.O_RDONLY | flags)
        if self.stdin:
            try:
                self.stdin_fd = os.open(self.stdin, stdin_mode | flags)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise

    def paths(self) -> dict[str, str]:
        """The paths as Tasks.Create / Exec take them."""
        return {"stdin": self.stdin, "stdout": self.stdout, "stderr": self.stderr}

    def close_stdin(self) -> None:
        """Close our end of the stdin FIFO (the process reads EOF once no writer is left)."""
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    def close(self, remove: bool = False) -> None:
        """Close our ends; with `remove`, delete the FIFOs' private dir as well."""
        self.close_stdin()
        for name in ("stdout_fd", "stderr_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if remove and self.directory:
            remove_tree(self.directory)


def _mkfifo(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    os.mkfifo(path, 0o600)
    return path


def remove_fifo_dir(fifo_root: str, paths: list[str]) -> None:
    """Remove the private FIFO dir of a deleted process, if moorctl made it under `fifo_root`."""
    root = os.path.realpath(fifo_root)
    for path in paths:
        if not path or "://" in path:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        # Only a direct child of our fifo root: never anything a user named elsewhere.
        if os.path.dirname(directory) == root and os.path.isdir(directory):
            remove_tree(directory)


def remove_tree(directory: str) -> None:
    """Remove a FIFO dir, errors ignored, never following a symlink (as shutil.rmtree):
    its FIFOs directly, anything else through shutil (importing shutil costs start-up)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    import shutil

                    shutil.rmtree(os.path.join(directory, entry.name), ignore_errors=True)
                else:
                    os.unlink(entry.name, dir_fd=fd)
        os.rmdir(directory)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- the local terminal -----------------------------------------------------------------


def console_fd() -> int:
    """The first of stdin, stdout, stderr that is a terminal (-1: none), as ctr's console.Current."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return fd
        except OSError:
            continue
    return -1


def window_size(fd: int) -> tuple[int, int] | None:
    """(columns, rows) of the terminal on `fd`, or None when unknown."""
    if fd < 0:
        return None
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if size.columns <= 0 or size.lines <= 0:
        return None
    return size.columns, size.lines


@contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on `fd` in raw mode for the block; its settings restored however it ends."""
    if fd < 0 or not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def stdin_readable() -> bool:
    """Whether fd 0 is open (a closed stdin is not forwarded)."""
    try:
        os.fstat(0)
    except OSError:
        return False
    return True


# -- the session -------------------------------------------------------------------------


class Session:
    """One process's interactive life on the client: wait, start, relay, exit status.

    `client` is moord's Client (thread-safe: the waiter has its own socket).
    `close_io_on_eof`: run/start/exec: stdin EOF closes the task's stdin (ctr's stdinCloser).
    `detach_signals`: attach -t: a signal to moorctl detaches instead of reaching the task.
    """

    def __init__(
        self,
        client: Any,
        container_id: str,
        fifos: FifoSet,
        exec_id: str = "",
        tty: bool = False,
        forward_stdin: bool = True,
        close_io_on_eof: bool = True,
        forward_signals: bool = True,
        detach_signals: bool = False,
    ) -> None:
        self.client = client
        self.container_id = container_id
        self.fifos = fifos
        self.exec_id = exec_id
        self.tty = tty
        self.forward_stdin = forward_stdin
        self.close_io_on_eof = close_io_on_eof
        self.forward_signals = forward_signals
        self.detach_signals = detach_signals
        self.exit_status: int | None = None
        self.detached_by = 0
        self._wake_r = -1
        self._wake_w = -1
        self._pending: list[int] = []
        self._resize = False
        self._wait_error: BaseException | None = None
        self._waiter: threading.Thread | None = None

    @property
    def _ids(self) -> dict[str, str]:
        return {"container_id": self.container_id, "exec_id": self.exec_id}

    def run(self, start: Callable[[], None] | None) -> int:
        """Wait (before Start), start via `start` (None: already running), relay until the exit.

        Returns the process's exit status (128+N when a signal detached us first).
        """
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        console = console_fd() if self.tty else -1
        try:
            with self._signals(), raw_mode(0 if console == 0 else -1):
                self._waiter = threading.Thread(target=self._wait, name="wait", daemon=True)
                self._waiter.start()
                if self.tty and not self.exec_id:
                    self._send_size(console)  # the init's pty exists from Create: sized before it runs
                if start is not None:
                    start()
                if self.tty and (self.exec_id or start is None):
                    self._send_size(console)  # an exec's pty exists only once started
                self._relay(console)
        finally:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
        if self.detached_by:
            return 128 + self.detached_by
        if self._wait_error is not None:
            raise self._wait_error
        assert self.exit_status is not None
        return self.exit_status

    def _wait(self) -> None:
        try:
            reply = self.client.call("tasks.wait", self._ids, timeout=WAIT_TIMEOUT)
            self.exit_status = int(reply["exit_status"])
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            self._wait_error = exc
        finally:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # full (already awake) or closed (session over)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """Handlers that only note the signal: the relay loop acts on it (no call in a handler)."""

        def noted(signum: int, _frame: object) -> None:
            if signum == signal.SIGWINCH:
                self._resize = True
            else:
                self._pending.append(signum)
            self._wake()

        wanted = [signal.SIGWINCH] if self.tty else []
        if self.forward_signals or self.detach_signals:
            wanted += list(FORWARDED_SIGNALS)
        if threading.current_thread() is not threading.main_thread():
            wanted = []  # a library caller in a thread: Python allows handlers only in the main one
        previous = {}
        try:
            for signum in wanted:
                previous[signum] = signal.signal(signum, noted)
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _send_size(self, console: int) -> None:
        size = window_size(console)
        if size is None:
            return
        from moord.messages.errors import MoordError

        try:
            self.client.call("tasks.resize_pty", {**self._ids, "width": size[0], "height": size[1]}, timeout=5)
        except MoordError:
            pass  # the process may be gone already: its exit ends the session

    def _handle_wakeups(self, console: int) -> None:
        from moord.messages.errors import MoordError

        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        if self._resize:
            self._resize = False
            self._send_size(console)
        while self._pending:
            signum = self._pending.pop(0)
            if self.detach_signals:
                self.detached_by = signum
                return
            try:
                self.client.call("tasks.kill", {**self._ids, "signal": int(signum)}, timeout=5)
            except MoordError:
                pass

    def _relay(self, console: int) -> None:
        """Copy stdin -> FIFO and FIFOs -> stdout/stderr until the exit (then drain) or a detach."""
        outputs = {fd: out for fd, out in ((self.fifos.stdout_fd, 1), (self.fifos.stderr_fd, 2)) if fd >= 0}
        reading_stdin = self.forward_stdin and self.fifos.stdin_fd >= 0 and stdin_readable()
        if self.fifos.stdin_fd >= 0 and not reading_stdin and self.close_io_on_eof:
            self._close_stdin()
        pending_in = bytearray()
        stdin_eof = False
        finished_at = 0.0
        while True:
            if self.exit_status is not None or self._wait_error is not None:
                if not finished_at:
                    finished_at = time.monotonic()
                if not outputs:
                    return
            if self.detached_by:
                return
            readers = [self._wake_r, *outputs]
            writers: list[int] = []
            if reading_stdin and not stdin_eof and len(pending_in) < STDIN_BUFFER_LIMIT:
                readers.append(0)
            if pending_in and self.fifos.stdin_fd >= 0:
                writers.append(self.fifos.stdin_fd)
            timeout = DRAIN_QUIET_SECONDS if finished_at else None
            ready_r, ready_w, _ = select.select(readers, writers, [], timeout)
            if finished_at and not ready_r and not ready_w:
                return  # exited, and the output has been quiet: what is left is not coming
            if self._wake_r in ready_r:
                self._handle_wakeups(console)
            for fd in list(outputs):
                if fd in ready_r and not _copy_out(fd, outputs[fd]):
                    del outputs[fd]
            if 0 in ready_r:
                data = _read(0)
                if data:
                    pending_in += data
                elif data is not None:
                    stdin_eof = True
            if self.fifos.stdin_fd in ready_w:
                pending_in = self._feed(pending_in)
            if stdin_eof and not pending_in and self.fifos.stdin_fd >= 0:
                self._stdin_done()
                reading_stdin = False

    def _feed(self, pending: bytearray) -> bytearray:
        try:
            written = os.write(self.fifos.stdin_fd, pending)
        except BlockingIOError:
            return pending
        except OSError:  # EPIPE: the process closed its stdin; drop what it will never read
            self._stdin_done()
            return bytearray()
        del pending[:written]
        return pending

    def _stdin_done(self) -> None:
        """Our stdin ended: close the FIFO and, as ctr does, the task's stdin (CloseIO)."""
        if self.close_io_on_eof:
            self._close_stdin()
        else:
            self.fifos.close_stdin()

    def _close_stdin(self) -> None:
        from moord.messages.errors import MoordError

        self.fifos.close_stdin()
        if not self.tty:
            return  # plain FIFO stdin: our close was its last writer, the process reads EOF already
        try:
            # The shim holds the stdin FIFO open for the pty: only CloseIO ends it (a ^D).
            self.client.call("tasks.close_io", {**self._ids, "stdin": True}, timeout=5)
        except MoordError:
            pass


def _read(fd: int) -> bytes | None:
    """Up to CHUNK bytes; b"" at the end (EIO from a hung-up terminal counts as the end); None: nothing yet."""
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EIO, errno.EBADF):
            return b""
        raise


def _copy_out(fd: int, out: int) -> bool:
    """Copy what a FIFO has to our stdout/stderr; False when the FIFO has ended."""
    data = _read(fd)
    if data is None:
        return True
    if not data:
        return False
    _write_all(out, data)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO):
                return  # nobody reads our output any more: keep draining, drop it
            raise
        view = view[written:]
