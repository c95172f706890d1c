"""A real moord for tests: its own root/state dirs, its own NOTIFY_SOCKET, full cleanup.

Cleanup must hold when a test fails: every process the daemon started (children,
shims, containers), every mount under its dirs, every runc container in its runc root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from moord.bus.client import Client

TEST_PREFIX = "moord-t-"
# Bases this test session made: its leak check must not blame another session's mounts.
SESSION_BASES: list[str] = []


def moorctl_argv(config: str, *args: str) -> list[str]:
    """argv of the real moorctl console entry, run by this interpreter."""
    return [sys.executable, "-m", "moord.client", "--config", config, *args]


@dataclass
class Daemon:
    """A running moord and what a test needs to talk to it."""

    base: str
    config_path: str
    process: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notifications: list[str] = field(default_factory=list)
    log_path: str = ""

    @property
    def root(self) -> str:
        """The daemon's root dir."""
        return os.path.join(self.base, "root")

    @property
    def state(self) -> str:
        """The daemon's state dir."""
        return os.path.join(self.base, "state")

    @property
    def ipc_dir(self) -> str:
        """Where its ZeroMQ endpoints live."""
        return os.path.join(self.state, "ipc")

    def client(self, namespace: str = "default", timeout: float = 10.0) -> Client:
        """A ZeroMQ client for this daemon."""
        return Client(self.ipc_dir, namespace=namespace, timeout=timeout)

    def moorctl(self, *args: str, timeout: float = 120, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real moorctl against this daemon."""
        return subprocess.run(
            moorctl_argv(self.config_path, *args), capture_output=True, text=True, timeout=timeout, input=input
        )

    def start(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Start moord and wait for READY=1 on our notify socket."""
        notify_path = os.path.join(self.base, "notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        self.log_path = os.path.join(self.base, "moord.log")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moord.supervisor.main", "--config", self.config_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        if wait:
            self.wait_notification("READY=1", timeout)

    def wait_notification(self, needle: str, timeout: float = 60.0) -> str:
        """Block until the daemon sends a notification containing `needle`."""
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.notifications:
                if needle in message:
                    return message
            self.notify.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self.notifications.append(self.notify.recv(4096).decode())
            except socket.timeout:
                break
            if self.process and self.process.poll() is not None and not any(needle in m for m in self.notifications):
                break
        raise AssertionError(f"moord never sent {needle!r}; log:\n{self.log()}")

    def log(self) -> str:
        """The daemon's log so far."""
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-20000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the root and wait; returns its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        status = self.process.returncode
        self.process = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        self.notifications.clear()
        reap_orphans()
        return status

    def kill9(self) -> None:
        """kill -9 the root process (children follow by PDEATHSIG; shims stay)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        self.notifications.clear()
        wait_until(lambda: not child_pids(self), 10, "children to follow the root")
        reap_orphans()

    def tree(self) -> dict[str, Any]:
        """The supervision tree as the daemon reports it."""
        return self.client().call("supervisor.tree")

    def child_pid(self, name: str) -> int:
        """pid of one subsystem process."""
        for child in self.tree()["children"]:
            if child["name"] == name:
                return int(child["pid"])
        raise KeyError(name)


def child_pids(daemon: Daemon) -> list[int]:
    """Subsystem processes of this daemon still alive (by their config path)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "moord.supervisor.child" in cmdline and any(daemon.base in part for part in cmdline):
            found.append(proc.pid)
    return found


def reap_orphans(keep: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Reap zombie children other than `keep`: orphans re-parented to us as subreaper."""
    for proc in psutil.Process().children():
        try:
            if proc.pid not in keep and proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            continue


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until truthy; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_config(base: str, extra: str = "") -> str:
    """A config file rooting the daemon under `base`."""
    path = os.path.join(base, "config.toml")
    with open(path, "w") as fh:
        fh.write(f'root = "{base}/root"\nstate = "{base}/state"\n[debug]\nlevel = "info"\n{extra}\n')
    return path


def new_daemon(extra_config: str = "") -> Daemon:
    """A daemon with fresh dirs (not started)."""
    base = tempfile.mkdtemp(prefix=TEST_PREFIX, dir="/tmp")
    SESSION_BASES.append(base)
    return Daemon(base=base, config_path=write_config(base, extra_config))


def cleanup_base(base: str) -> None:
    """Remove every trace of a test daemon: processes, runc state, mounts, files."""
    bundles = os.path.join(base, "state", "io.containerd.runtime.v2.task")
    for dirpath, _, files in os.walk(bundles):
        if "shim.pid" in files:  # shims run detached, in "/", under their own title
            try:
                with open(os.path.join(dirpath, "shim.pid")) as fh:
                    os.kill(int(fh.read().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmdline = " ".join(proc.info.get("cmdline") or [])
            cwd = proc.info.get("cwd") or ""
            if proc.pid == os.getpid():
                continue
            if base in cmdline or cwd.startswith(base):
                proc.kill()
        except psutil.Error:
            continue
    reap_orphans()
    runc_root = os.path.join(base, "state", "runc")
    if os.path.isdir(runc_root):
        for ns in os.listdir(runc_root):
            root = os.path.join(runc_root, ns)
            for runtime in ("runc", "crun"):
                if shutil.which(runtime) is None:
                    continue
                listing = subprocess.run([runtime, "--root", root, "list", "-q"], capture_output=True, text=True)
                for cid in listing.stdout.split():
                    subprocess.run([runtime, "--root", root, "delete", "-f", cid], capture_output=True)
    unmount_under(base)
    shutil.rmtree(base, ignore_errors=True)


def unmount_under(base: str) -> None:
    """Lazily unmount everything mounted at or below `base`, deepest first."""
    for _ in range(5):
        with open("/proc/self/mountinfo") as fh:
            targets = [line.split()[4] for line in fh]
        inside = sorted({t for t in targets if t == base or t.startswith(base + "/")}, key=len, reverse=True)
        if not inside:
            return
        for target in inside:
            subprocess.run(["umount", "-l", target], capture_output=True)
