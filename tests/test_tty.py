"""moorctl's interactive side driven through real pseudo-terminals: `run -t`, `tasks attach`,
`tasks exec -t`; window size, raw mode restored, exit codes, stdin EOF through CloseIO."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time
from typing import Iterator

import pytest

from tests.daemon import Daemon, moorctl_argv, wait_until

IMAGE = "docker.io/library/busybox:latest"

# Runs moorctl on the pty it was forked onto; reports whether the terminal's settings
# came back as they were, and moorctl's exit status.
WRAPPER = """
import subprocess, sys, termios
before = termios.tcgetattr(0)
child = subprocess.Popen(sys.argv[1:])
print("PID", child.pid, flush=True)
rc = child.wait()
after = termios.tcgetattr(0)
print("RESTORED" if after == before else "CHANGED", rc, flush=True)
sys.exit(rc)
"""


class Terminal:
    """A command on the slave side of a fresh pty; the test holds the master."""

    def __init__(self, argv: list[str], columns: int = 80, rows: int = 24) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal and stdio
            try:
                os.execv(sys.executable, [sys.executable, "-c", WRAPPER, *argv])
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.output = b""
        self.status: int | None = None
        self.resize(columns, rows)

    def resize(self, columns: int, rows: int) -> None:
        """Set the window size (the kernel sends SIGWINCH to the foreground group)."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def send(self, data: bytes) -> None:
        """Type into the terminal."""
        os.write(self.fd, data)

    def _read(self, timeout: float) -> bytes | None:
        """What arrives within `timeout` (None: nothing; b"": the slave side is closed)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        try:
            data = os.read(self.fd, 65536)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        self.output += data
        return data

    def expect(self, needle: bytes, timeout: float = 30.0) -> bytes:
        """Read until `needle` appears in the output; the output so far."""
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            data = self._read(0.2)
            if time.monotonic() > deadline or (data == b"" and self._done()):
                raise AssertionError(f"{needle!r} not seen; output: {self.output[-2000:]!r}")
        return self.output

    def pid_of_moorctl(self) -> int:
        """The pid the wrapper printed."""
        self.expect(b"PID ")
        deadline = time.monotonic() + 30
        while b"\n" not in self.output.split(b"PID ", 1)[1] and time.monotonic() < deadline:
            self._read(0.2)  # the number may arrive after the prefix
        line = self.output.split(b"PID ", 1)[1].split(b"\n", 1)[0]
        return int(line.strip())

    def _done(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def wait(self, timeout: float = 30.0) -> int:
        """Exit status of the wrapper (moorctl's), reading output meanwhile."""
        deadline = time.monotonic() + timeout
        while not self._done():
            if time.monotonic() > deadline:
                raise AssertionError(f"still running; output: {self.output[-2000:]!r}")
            self._read(0.1)
        while self._read(0.05) and len(self.output) < 1 << 20:
            pass  # the rest of the output
        assert self.status is not None
        return self.status

    def close(self) -> None:
        """Kill what still runs, close the master."""
        if not self._done():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    """Terminals a test opens, all closed at its end."""
    opened: list[Terminal] = []
    yield opened
    for term in opened:
        term.close()


def _open(terminals: list[Terminal], daemon: Daemon, *args: str, columns: int = 80, rows: int = 24) -> Terminal:
    term = Terminal(moorctl_argv(daemon.config_path, *args), columns, rows)
    terminals.append(term)
    return term


def _forget(daemon: Daemon, container_id: str) -> None:
    """Kill, delete and remove a container, whatever state it was left in."""
    daemon.moorctl("kill", "-s", "KILL", container_id)
    try:
        daemon.client(timeout=30).call("tasks.wait", {"container_id": container_id}, timeout=30)
    except Exception:  # noqa: BLE001  (no task: nothing to wait for)
        pass
    daemon.moorctl("tasks", "rm", container_id)
    daemon.moorctl("containers", "rm", container_id)


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as fh:
        mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signum - 1)))


def _fifo_dirs(daemon: Daemon) -> list[str]:
    root = os.path.join(daemon.state, "fifo")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_run_t_is_an_interactive_shell_with_window_size_and_exit_code(imported: Daemon, terminals: list[Terminal]) -> None:
    try:
        term = _open(terminals, imported, "run", "-t", "--rm", IMAGE, "tty-shell", "sh", columns=80, rows=24)
        term.expect(b"# ")
        term.send(b"echo $((6*7))\r")
        term.expect(b"42")
        term.send(b"tty; stty size\r")
        term.expect(b"/dev/pts/")
        term.expect(b"24 80")
        term.resize(100, 30)
        time.sleep(0.5)  # SIGWINCH -> moorctl -> tasks.resize_pty
        term.send(b"stty size\r")
        term.expect(b"30 100")
        # Raw mode: ^C is a byte for the container's terminal, not a signal for moorctl.
        term.send(b"sleep 30\r")
        time.sleep(0.5)
        term.send(b"\x03")
        term.send(b"echo still-here\r")
        term.expect(b"still-here\r\n")
        term.send(b"exit 5\r")
        assert term.wait() == 5
        assert b"RESTORED 5" in term.output
        assert "tty-shell" not in imported.moorctl("containers", "ls").stdout
    finally:
        _forget(imported, "tty-shell")


def test_run_t_without_a_local_terminal_ends_on_stdin_eof(imported: Daemon) -> None:
    before = _fifo_dirs(imported)
    result = imported.moorctl("run", "-t", "--rm", IMAGE, "tty-pipe", "cat", input="hello\n", timeout=60)
    assert result.returncode == 0, result.stderr
    # The pty echoes the line and cat prints it: both with the terminal's \r\n, on stdout only.
    assert result.stdout.count("hello") == 2 and result.stderr == ""
    assert _fifo_dirs(imported) == before


def test_attach_to_a_detached_terminal(imported: Daemon, terminals: list[Terminal]) -> None:
    try:
        started = imported.moorctl("run", "-d", "-t", IMAGE, "tty-att", "sh", "-c", "read line; echo got:$line; exit 3")
        assert started.returncode == 0, started.stderr
        assert len(_fifo_dirs(imported)) >= 1
        term = _open(terminals, imported, "tasks", "attach", "tty-att")
        time.sleep(1.0)  # let the attach open the FIFOs
        term.send(b"hello\r")
        term.expect(b"got:hello")
        assert term.wait() == 3
        assert b"RESTORED 3" in term.output
        # As ctr's attach: the exited task is deleted (its FIFOs with it); the container stays.
        assert "tty-att" not in imported.moorctl("tasks", "ls").stdout
        assert "tty-att" in imported.moorctl("containers", "ls").stdout
    finally:
        _forget(imported, "tty-att")


def test_a_signal_detaches_a_terminal_attach_and_the_task_runs_on(imported: Daemon, terminals: list[Terminal]) -> None:
    try:
        assert imported.moorctl("run", "-d", "-t", IMAGE, "tty-det", "sh", "-c", "read x; exit 4").returncode == 0
        term = _open(terminals, imported, "tasks", "attach", "tty-det")
        moorctl_pid = term.pid_of_moorctl()
        # Attached once moorctl catches SIGTERM (its session's handlers are installed).
        wait_until(lambda: _catches(moorctl_pid, signal.SIGTERM), 30, "moorctl to attach")
        os.kill(moorctl_pid, signal.SIGTERM)
        assert term.wait() == 128 + signal.SIGTERM
        assert b"RESTORED" in term.output
        tasks = imported.moorctl("tasks", "ls").stdout
        assert any(line.split()[0] == "tty-det" and line.split()[2] == "RUNNING" for line in tasks.splitlines()[1:])
        # A second attach still reaches the task.
        again = _open(terminals, imported, "tasks", "attach", "tty-det")
        time.sleep(1.0)
        again.send(b"bye\r")
        assert again.wait() == 4
    finally:
        _forget(imported, "tty-det")


def test_exec_t_opens_a_shell_in_a_running_container(imported: Daemon, terminals: list[Terminal]) -> None:
    try:
        assert imported.moorctl("run", "-d", IMAGE, "tty-exec", "sleep", "60").returncode == 0
        term = _open(terminals, imported, "tasks", "exec", "-t", "--exec-id", "sh1", "tty-exec", "sh", columns=120, rows=40)
        term.expect(b"# ")
        term.send(b"tty; stty size; echo $TERM\r")
        term.expect(b"/dev/pts/")
        term.expect(b"40 120")
        term.expect(b"xterm")
        term.send(b"exit 6\r")
        assert term.wait() == 6
        assert b"RESTORED 6" in term.output
        pids = imported.client().call("tasks.pids", {"container_id": "tty-exec"})["processes"]
        assert not [p for p in pids if p["exec_id"] == "sh1"]
    finally:
        _forget(imported, "tty-exec")


def test_tasks_start_reuses_the_kept_container_with_its_terminal(imported: Daemon, terminals: list[Terminal]) -> None:
    try:
        first = imported.moorctl("run", "-t", IMAGE, "tty-kept", "sh", "-c", "echo round; exit 2", input="")
        assert first.returncode == 2, first.stderr
        assert "round" in first.stdout
        term = _open(terminals, imported, "tasks", "start", "tty-kept")
        term.expect(b"round")
        assert term.wait() == 2
        assert b"RESTORED 2" in term.output
        assert "tty-kept" not in imported.moorctl("tasks", "ls").stdout
    finally:
        _forget(imported, "tty-kept")


def test_exec_user_name_is_resolved_in_the_container(imported: Daemon) -> None:
    try:
        assert imported.moorctl("run", "-d", IMAGE, "tty-user", "sleep", "60").returncode == 0
        result = imported.moorctl("tasks", "exec", "--exec-id", "who", "--user", "nobody", "tty-user", "id", "-u")
        passwd = imported.moorctl("tasks", "exec", "--exec-id", "pw", "tty-user", "grep", "^nobody:", "/etc/passwd")
        if passwd.returncode != 0:
            pytest.skip("the busybox image has no user nobody")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == passwd.stdout.split(":")[2]
    finally:
        _forget(imported, "tty-user")
