"""Task operations at containerd depth, with real runc and crun and real containers.

Exec, kill --all, pids, pause/resume, update, metrics, file:// logs, OOM under a memory
limit, crun per container, and a terminal driven through runc's console socket. The
runtime actor runs in-process (tests/test_runtime.py's Env); every test undoes its
shims, runc/crun state and mounts, also when it fails. Container ids carry a random
part: their cgroups (/moord/default/<id>) are shared with other test runs on the host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest

from moord.bus.events import EventSubscriber
from moord.messages.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from moord.oci import spec as oci
from moord.shims.shim import runtime_command, runtime_root
from tests.daemon import reap_orphans
from tests.test_runtime import BUSYBOX, NS, RUNC, Env, _fifo, _read_all

CRUN = shutil.which("crun")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or RUNC is None or not os.path.exists(BUSYBOX), reason="needs root, runc and busybox"
)






class TaskEnv(Env):
    """Env plus specs with options, crun clean-up and an event subscriber."""

    def __init__(self, rootfs: str) -> None:
        super().__init__(rootfs)
        self.subscriber = EventSubscriber(self.config.ipc_dir, ["/tasks/"])
        time.sleep(0.2)  # the subscription must reach the forwarder first

    def uid(self, name: str) -> str:
        return f"tk-{name}-{secrets.token_hex(3)}"

    def make(self, name: str, args: list[str], runtime: dict[str, Any] | None = None, tty: bool = False, **limits: Any) -> str:
        """A container record with its spec; returns the id."""
        cid = self.uid(name)
        spec = oci.build_spec(NS, cid, {"config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}}, args=args, rootfs=self.rootfs, tty=tty, **limits)
        record: dict[str, Any] = {"id": cid, "spec": oci.dumps(spec)}
        if runtime:
            record["runtime"] = runtime
        self.client.call("containers.create", {"container": record})
        self.ids.append(cid)
        return cid

    def create_task(self, cid: str, **kw: Any) -> int:
        return int(self.client.call("tasks.create", {"container_id": cid, "rootfs": self.rootfs_mounts(), **kw})["pid"])

    def run(self, name: str, args: list[str], **kw: Any) -> str:
        """Create and start."""
        runtime = kw.pop("runtime", None)
        limits = {k: kw.pop(k) for k in ("memory_limit", "cpus", "pids_limit") if k in kw}
        cid = self.make(name, args, runtime=runtime, tty=bool(kw.get("terminal")), **limits)
        self.create_task(cid, **kw)
        self.client.call("tasks.start", {"container_id": cid})
        return cid

    def call(self, kind: str, **payload: Any) -> dict[str, Any]:
        return self.client.call(kind, payload)

    def topics(self, seconds: float = 1.0) -> list[tuple[str, dict[str, Any]]]:
        """Events received so far (waits up to `seconds` for stragglers)."""
        out = []
        deadline = time.monotonic() + seconds
        while (event := self.subscriber.receive(timeout=max(0.05, deadline - time.monotonic()))) is not None:
            out.append((event["topic"], event["event"]))
        return out

    def crun_ids(self) -> list[str]:
        if CRUN is None:
            return []
        out = subprocess.run(
            runtime_command(CRUN, runtime_root(self.config.state, NS, "crun"), "list", "-q"), capture_output=True, text=True
        )
        return out.stdout.split()

    def cleanup(self) -> None:
        try:
            self.subscriber.close()
        finally:
            try:
                self.stop_runtime()
            finally:
                self._kill_shims()
                for cid in self.crun_ids():
                    subprocess.run(
                        runtime_command(CRUN or "crun", runtime_root(self.config.state, NS, "crun"), "delete", "-f", cid),
                        capture_output=True,
                    )
                super().cleanup()


@pytest.fixture
def env(rootfs: str) -> Iterator[TaskEnv]:
    e = TaskEnv(rootfs)
    try:
        e.start_runtime()
        yield e
    finally:
        e.cleanup()


def _delete(env: TaskEnv, cid: str) -> dict[str, Any]:
    reply = env.call("tasks.delete", container_id=cid)
    assert not os.path.exists(env.bundle(cid))
    assert cid not in env.runc_ids() and cid not in env.crun_ids()
    return reply


def _until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# -- step 1: kill --all, pids, pause/resume, update, metrics --------------------------------


def test_pids_pause_resume_update_metrics_and_kill_all(env: TaskEnv) -> None:
    cid = env.run("busy", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    pids = _until(lambda: [p["pid"] for p in env.call("tasks.pids", container_id=cid)["processes"]] if len(
        env.call("tasks.pids", container_id=cid)["processes"]) >= 3 else None)
    assert env.get(cid)["pid"] in pids

    metrics = env.call("tasks.metrics", container_id=cid)
    assert metrics["cgroup_version"] == 1
    assert metrics["memory"]["usage"] > 0 and metrics["memory"]["limit"] == 0
    assert metrics["pids"]["current"] == 3
    assert metrics["cpu"]["usage_total"] > 0

    env.call("tasks.update", container_id=cid, resources={"memory": {"limit": 64 << 20, "swap": 64 << 20}, "pids": {"limit": 50}})
    metrics = env.call("tasks.metrics", container_id=cid)
    assert metrics["memory"]["limit"] == 64 << 20 and metrics["pids"]["limit"] == 50
    with pytest.raises(InvalidArgument):
        env.call("tasks.update", container_id=cid, resources={"memory": {"limit": "lots"}})

    env.call("tasks.pause", container_id=cid)
    assert env.get(cid)["status"] == "paused"
    with pytest.raises(FailedPrecondition):
        env.call("tasks.pause", container_id=cid)
    with pytest.raises(FailedPrecondition):
        env.call("tasks.delete", container_id=cid)
    with open(f"/sys/fs/cgroup/freezer/moord/{NS}/{cid}/freezer.state") as fh:
        assert fh.read().strip() == "FROZEN"
    env.call("tasks.resume", container_id=cid)
    assert env.get(cid)["status"] == "running"
    with pytest.raises(FailedPrecondition):
        env.call("tasks.resume", container_id=cid)

    env.call("tasks.kill", container_id=cid, signal=9, all=True)
    assert env.wait(cid)["exit_status"] == 137
    for pid in pids:
        reap_orphans()
        assert not os.path.exists(f"/proc/{pid}/cmdline") or not open(f"/proc/{pid}/cmdline").read().startswith("sleep")
    topics = [t for t, _ in env.topics()]
    assert topics.index("/tasks/paused") < topics.index("/tasks/resumed") < topics.index("/tasks/exit")
    with pytest.raises(FailedPrecondition):
        env.call("tasks.metrics", container_id=cid)
    _delete(env, cid)


# -- step 2: exec -------------------------------------------------------------------------


def test_exec_start_wait_kill_delete(env: TaskEnv) -> None:
    cid = env.run("host", ["sleep", "1000"])
    out_path, out_fd = _fifo(env, "exec-out")
    try:
        process = {"args": ["sh", "-c", "echo from-exec; echo oops >&2; exit 3"], "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "cwd": "/",
                   "user": {"uid": 0, "gid": 0}}
        env.call("tasks.exec", container_id=cid, exec_id="one", spec=process, stdout=out_path)
        with pytest.raises(Exception):
            env.call("tasks.exec", container_id=cid, exec_id="one", spec=process)
        assert env.client.call("tasks.get", {"container_id": cid, "exec_id": "one"})["process"]["status"] == "created"
        waited: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: waited.update(env.client.call(
            "tasks.wait", {"container_id": cid, "exec_id": "one"}, timeout=30)))
        waiter.start()  # a wait before start blocks until the exec'd process exits
        pid = env.call("tasks.start", container_id=cid, exec_id="one")["pid"]
        assert pid > 0
        waiter.join(30)
        assert waited["exit_status"] == 3
        assert _read_all(out_fd) == b"from-exec\n"
        process_state = env.client.call("tasks.get", {"container_id": cid, "exec_id": "one"})["process"]
        assert process_state["status"] == "stopped" and process_state["id"] == "one"
        reply = env.client.call("tasks.delete", {"container_id": cid, "exec_id": "one"})
        assert reply["exit_status"] == 3 and reply["id"] == "one"
        with pytest.raises(NotFound):
            env.client.call("tasks.get", {"container_id": cid, "exec_id": "one"})
    finally:
        os.close(out_fd)

    env.call("tasks.exec", container_id=cid, exec_id="long", spec={"args": ["sleep", "500"], "cwd": "/", "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
    env.call("tasks.start", container_id=cid, exec_id="long")
    pids = {p["pid"]: p["exec_id"] for p in env.call("tasks.pids", container_id=cid)["processes"]}
    assert "long" in pids.values()
    with pytest.raises(FailedPrecondition):
        env.client.call("tasks.delete", {"container_id": cid, "exec_id": "long"})
    env.client.call("tasks.kill", {"container_id": cid, "exec_id": "long", "signal": 9})
    assert env.client.call("tasks.wait", {"container_id": cid, "exec_id": "long"})["exit_status"] == 137
    assert env.get(cid)["status"] == "running"  # the init is untouched
    env.client.call("tasks.delete", {"container_id": cid, "exec_id": "long"})

    env.call("tasks.kill", container_id=cid, signal=9)
    assert env.wait(cid)["exit_status"] == 137
    with pytest.raises(FailedPrecondition):
        env.call("tasks.exec", container_id=cid, exec_id="late", spec={"args": ["true"]})
    with pytest.raises(InvalidArgument):
        env.call("tasks.exec", container_id=cid, exec_id="bad/id", spec={"args": ["true"]})
    events = env.topics()
    added = [e for t, e in events if t == "/tasks/exec-added"]
    started = [e for t, e in events if t == "/tasks/exec-started"]
    exits = [e for t, e in events if t == "/tasks/exit"]
    assert [e["exec_id"] for e in added] == ["one", "long"]
    assert started[0] == {"container_id": cid, "exec_id": "one", "pid": pid}
    assert [(e["id"], e["exit_status"]) for e in exits] == [("one", 3), ("long", 137), (cid, 137)]
    _delete(env, cid)


# -- step 3: file:// logs -----------------------------------------------------------------


def test_stdout_and_stderr_to_a_log_file(env: TaskEnv) -> None:
    log_path = os.path.join(env.base, "logs", "c.log")
    uri = f"file://{log_path}"
    cid = env.run("logger", ["sh", "-c", "echo out; echo err >&2; dd if=/dev/zero bs=1k count=256 2>/dev/null | head -c 200000"],
                  stdout=uri, stderr=uri)
    assert env.wait(cid)["exit_status"] == 0
    with open(log_path, "rb") as fh:
        data = fh.read()
    assert data.startswith(b"out\nerr\n") and len(data) == 8 + 200000
    assert env.get(cid)["stdout"] == uri
    _delete(env, cid)
    other = env.make("badlog", ["true"])
    with pytest.raises(InvalidArgument):
        env.create_task(other, stdout="file://relative/path")
    with pytest.raises(Exception):
        env.create_task(other, stdout="binary:///bin/logger")
    assert not env.mounts_under_base()


# -- step 4: OOM ----------------------------------------------------------------------------


def test_oom_kill_under_a_memory_limit(env: TaskEnv) -> None:
    cid = env.run("hog", ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], memory_limit=16 << 20)
    assert env.wait(cid)["exit_status"] == 137
    events = env.topics(2.0)
    topics = [t for t, _ in events]
    assert "/tasks/oom" in topics, topics
    assert dict(events)["/tasks/oom"] == {"container_id": cid}
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit")
    _delete(env, cid)


# -- step 5: crun ---------------------------------------------------------------------------


@pytest.mark.skipif(CRUN is None, reason="needs crun")
def test_crun_per_container(env: TaskEnv) -> None:
    out_path, out_fd = _fifo(env, "crun-out")
    try:
        cid = env.run("crun", ["sh", "-c", "echo hello from crun; sleep 1000 & wait"], stdout=out_path,
                      options={"binary_name": "crun"})
        assert cid in env.crun_ids() and cid not in env.runc_ids()
        _until(lambda: b"hello from crun" in _read_all(out_fd, 0.3))
        env.call("tasks.exec", container_id=cid, exec_id="x", spec={"args": ["sh", "-c", "exit 4"], "cwd": "/", "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
        env.call("tasks.start", container_id=cid, exec_id="x")
        assert env.client.call("tasks.wait", {"container_id": cid, "exec_id": "x"})["exit_status"] == 4
        env.call("tasks.pause", container_id=cid)
        assert env.get(cid)["status"] == "paused"
        env.call("tasks.resume", container_id=cid)
        assert len(env.call("tasks.pids", container_id=cid)["processes"]) >= 2
        assert env.call("tasks.metrics", container_id=cid)["pids"]["current"] >= 2
        env.call("tasks.kill", container_id=cid, signal=9)
        assert env.wait(cid)["exit_status"] == 137
        _delete(env, cid)
    finally:
        os.close(out_fd)
    # By runtime name, and a killed crun shim is cleaned up through crun too.
    cid = env.run("crun-name", ["sleep", "1000"], runtime={"name": "io.containerd.crun.v2"})
    assert cid in env.crun_ids()
    os.kill(env.shim_pid(cid), 9)
    assert env.wait(cid)["exit_status"] == 255
    assert cid not in env.crun_ids()
    _delete(env, cid)
    with pytest.raises(InvalidArgument):
        env.create_task(env.make("nope", ["true"]), options={"binary_name": "/tmp/evil"})
    assert not env.mounts_under_base()


# -- step 6: terminal ----------------------------------------------------------------------


def test_terminal_session_and_resize(env: TaskEnv) -> None:
    out_path, out_fd = _fifo(env, "tty-out")
    in_path = os.path.join(env.fifo_dir, "tty-in")
    os.mkfifo(in_path, 0o600)
    in_fd = os.open(in_path, os.O_RDWR | os.O_NONBLOCK)  # as ctr does: writable before the shim opens it
    try:
        cid = env.run("tty", ["sh"], terminal=True, stdin=in_path, stdout=out_path)
        assert env.get(cid)["terminal"] is True
        env.call("tasks.resize_pty", container_id=cid, width=100, height=40)
        os.write(in_fd, b"tty; stty size; echo $((6*7))\n")
        seen = b""

        def got() -> bool:
            nonlocal seen
            seen += _read_all(out_fd, 0.3)
            return b"42" in seen.split(b"$((6*7))", 1)[-1]

        _until(got)
        assert b"/dev/pts/0" in seen and b"40 100" in seen
        os.write(in_fd, b"exit 5\n")
        assert env.wait(cid)["exit_status"] == 5
        with pytest.raises(FailedPrecondition):
            env.call("tasks.resize_pty", container_id=cid, width=80, height=24)
        _delete(env, cid)
    finally:
        os.close(out_fd)
        os.close(in_fd)


def test_exec_with_a_terminal(env: TaskEnv) -> None:
    cid = env.run("ttyexec", ["sleep", "1000"])
    out_path, out_fd = _fifo(env, "tty-exec-out")
    try:
        env.call("tasks.exec", container_id=cid, exec_id="t", spec={"args": ["tty"], "cwd": "/", "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
                 stdout=out_path, terminal=True)
        env.call("tasks.start", container_id=cid, exec_id="t")
        assert env.client.call("tasks.wait", {"container_id": cid, "exec_id": "t"})["exit_status"] == 0
        assert _read_all(out_fd, 3).startswith(b"/dev/pts/")
    finally:
        os.close(out_fd)
    env.call("tasks.kill", container_id=cid, signal=9)
    env.wait(cid)
    _delete(env, cid)


# -- moorctl (client/commands_tasks.py) through a whole daemon --------------------------------


def _moorctl_tasks(daemon: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """moorctl with the tasks commands module loaded (until client/cli.py imports it)."""
    import sys

    code = "import sys; import moord.client.commands_tasks; from moord.client.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", daemon.config_path, *args], capture_output=True, text=True, timeout=120
    )


def test_moorctl_exec_ps_pause_resume_metrics(imported: Any) -> None:
    image = "docker.io/library/busybox:latest"
    cid = f"tk-cli-{secrets.token_hex(3)}"
    assert imported.moorctl("run", "-d", image, cid, "sleep", "1000").returncode == 0
    try:
        result = _moorctl_tasks(imported, "tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo in-exec; exit 6")
        assert result.returncode == 6 and result.stdout == "in-exec\n", result.stderr
        ps = _moorctl_tasks(imported, "tasks", "ps", cid)
        assert ps.returncode == 0 and len(ps.stdout.splitlines()) == 2, ps.stderr
        assert _moorctl_tasks(imported, "tasks", "pause", cid).returncode == 0
        assert "PAUSED" in imported.moorctl("tasks", "ls").stdout
        assert _moorctl_tasks(imported, "tasks", "resume", cid).returncode == 0
        metrics = _moorctl_tasks(imported, "tasks", "metrics", "--format", "json", cid)
        assert metrics.returncode == 0 and '"current": 1' in metrics.stdout, metrics.stderr
    finally:
        imported.moorctl("kill", "-s", "KILL", cid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "RUNNING" in imported.moorctl("tasks", "ls").stdout:
            time.sleep(0.1)
        imported.moorctl("tasks", "rm", cid)
        imported.moorctl("containers", "rm", cid)
        imported.moorctl("snapshots", "rm", cid)


def test_checkpoint_is_a_clear_unimplemented(env: TaskEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFound):
        env.call("tasks.checkpoint", container_id="tk-no-such-task")
    cid = env.run("ckpt", ["sleep", "1000"])
    try:
        # Without criu the answer says so (the actor is in-process, so PATH is its PATH); with
        # a criu that works or not, tests/test_checkpoint.py covers both answers.
        with monkeypatch.context() as patch:
            patch.setenv("PATH", env.base)  # a directory without criu
            with pytest.raises(Unimplemented) as missing:
                env.call("tasks.checkpoint", container_id=cid)
        assert missing.value.code == "unimplemented"
        assert missing.value.message == "checkpoint needs CRIU, which is not installed on this host"
        assert env.get(cid)["status"] == "running"
    finally:
        env.call("tasks.kill", container_id=cid, signal=9)
    assert env.wait(cid)["exit_status"] == 137
    _delete(env, cid)
