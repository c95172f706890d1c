"""tasks.checkpoint and restore through runc and CRIU, or a precise refusal where CRIU cannot work.

Whether CRIU works is learnt here the way the runtime learns it: `criu check`. Where it
fails (criu 3.17 on a kernel >= 6.13, whose split [vvar]/[vvar_vclock] mappings it does
not know: "vdso: Unexpected rt vDSO area bounds"), the refusal is asserted word for word
and the checkpoint/restore round trip is skipped with criu's own reason. The runtime actor
runs in-process (tests/test_tasks.py's TaskEnv); a full daemon drives moorctl.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Iterator

import pytest

from moord.messages.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from moord.oci import spec as oci
from moord.shims import wire
from moord.shims.shim import first_criu_error
from tests.daemon import Daemon, wait_until
from tests.test_runtime import BUSYBOX, NS, RUNC
from tests.test_tasks import TaskEnv, env  # noqa: F401  (the runtime actor in-process, cleaned up even on failure)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or RUNC is None or not os.path.exists(BUSYBOX), reason="needs root, runc and busybox"
)

CRIU = shutil.which("criu")
IMAGE = "docker.io/library/busybox:latest"
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done"
TMPFS_TMP = {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}


def _criu_check_error() -> str:
    """criu check's first error line ("" when it passes), as the runtime derives it."""
    if CRIU is None:
        return "criu is not installed"
    result = subprocess.run([CRIU, "check"], capture_output=True, text=True, timeout=30)
    output = f"{result.stderr}\n{result.stdout}"
    if result.returncode == 0 and not first_criu_error(output):
        return ""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return first_criu_error(output) or (lines[-1] if lines else f"exit {result.returncode}")


CRIU_ERROR = _criu_check_error()
needs_working_criu = pytest.mark.skipif(bool(CRIU_ERROR), reason=f"CRIU does not work on this host: {CRIU_ERROR}")
needs_failing_criu = pytest.mark.skipif(
    CRIU is None or not CRIU_ERROR, reason="criu is missing or works here: the refusal cannot be observed"
)




@pytest.fixture
def image_dir() -> Iterator[str]:
    """An empty directory for a CRIU image."""
    base = tempfile.mkdtemp(prefix="md-ck-", dir="/tmp")
    try:
        yield os.path.join(base, "image")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _counter(env: TaskEnv, name: str) -> str:
    """A container counting into /tmp/n (a tmpfs: the test rootfs is read-only)."""
    cid = env.uid(name)
    spec = oci.build_spec(
        NS, cid, {"config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}}, args=["sh", "-c", COUNTER], rootfs=env.rootfs, mounts=[TMPFS_TMP]
    )
    env.client.call("containers.create", {"container": {"id": cid, "spec": oci.dumps(spec)}})
    env.ids.append(cid)
    return cid


def _count(pid: int) -> int:
    """The counter's value, read through the container's root."""
    with open(f"/proc/{pid}/root/tmp/n") as fh:
        return int(fh.read().strip() or 0)


def _until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _kill(env: TaskEnv, cid: str) -> None:
    try:
        env.call("tasks.kill", container_id=cid, signal=9)
    except (NotFound, FailedPrecondition):
        pass


# -- everywhere ------------------------------------------------------------------------


def test_checkpoint_is_refused_for_unknown_created_and_stopped_tasks(env: TaskEnv) -> None:
    with pytest.raises(NotFound):
        env.call("tasks.checkpoint", container_id="ck-no-such-task")
    cid = env.make("created", ["sleep", "1000"])
    env.create_task(cid)
    with pytest.raises(FailedPrecondition) as created:
        env.call("tasks.checkpoint", container_id=cid)
    assert created.value.message == f"cannot checkpoint task {cid}: it is created"
    env.call("tasks.start", container_id=cid)
    env.call("tasks.kill", container_id=cid, signal=9)
    env.wait(cid)
    with pytest.raises(FailedPrecondition) as stopped:
        env.call("tasks.checkpoint", container_id=cid)
    assert stopped.value.message == f"task {cid} is stopped"
    env.call("tasks.delete", container_id=cid)


def test_the_shim_wire_checks_checkpoint_requests() -> None:
    """shim.checkpoint needs a path; shim.create carries the restore image (wire.py mirrors the models)."""
    from moord.messages import envelope as codec

    def frame(kind: str, payload: dict[str, Any]) -> bytes:
        return codec.pack({"v": codec.PROTOCOL_VERSION, "id": "r1", "kind": kind, "payload": payload})

    served = set(wire.REQUESTS)
    got = wire.decode(frame("shim.checkpoint", {"path": "/x", "exit": True, "empty_namespaces": ["network"]}), served)
    assert (got.path, got.exit, got.work_path, got.empty_namespaces, got.open_tcp) == ("/x", True, "", ["network"], False)
    assert wire.decode(frame("shim.create", {"checkpoint": "/img"}), served).checkpoint == "/img"
    for bad in ({}, {"path": ""}, {"path": "/x", "exit": 1}, {"path": "/x", "empty_namespaces": "net"}):
        with pytest.raises(InvalidArgument):
            wire.decode(frame("shim.checkpoint", bad), served)


# -- where `criu check` fails ----------------------------------------------------------------


@needs_failing_criu
def test_checkpoint_and_restore_answer_criu_check_error(env: TaskEnv, image_dir: str) -> None:
    """The refusal quotes criu's own first error; the task is untouched and nothing is written."""
    cid = env.run("refused", ["sleep", "1000"])
    try:
        for _ in range(2):  # the second answer comes from the runtime's cached check
            with pytest.raises(Unimplemented) as refused:
                env.call("tasks.checkpoint", container_id=cid, path=image_dir, exit=True)
            assert refused.value.message == f"checkpoint needs CRIU; `criu check` fails on this host: {CRIU_ERROR}"
        assert env.get(cid)["status"] == "running"
        assert not os.path.exists(image_dir)
    finally:
        _kill(env, cid)
    os.makedirs(image_dir)
    other = env.make("restore", ["sleep", "1000"])
    with pytest.raises(Unimplemented) as restore:
        env.call("tasks.create", container_id=other, rootfs=env.rootfs_mounts(), checkpoint=image_dir)
    assert restore.value.message == f"restore needs CRIU; `criu check` fails on this host: {CRIU_ERROR}"
    with pytest.raises(NotFound):
        env.call("tasks.get", container_id=other)


@needs_failing_criu
def test_moorctl_checkpoint_prints_the_refusal(imported: Daemon) -> None:
    cid = "ck-cli-refused"
    assert imported.moorctl("run", "-d", IMAGE, cid, "sleep", "1000").returncode == 0
    try:
        result = imported.moorctl("tasks", "checkpoint", "--exit", cid)
        assert result.returncode == 1
        assert result.stderr.strip() == f"moorctl: unimplemented: checkpoint needs CRIU; `criu check` fails on this host: {CRIU_ERROR}"
        assert "RUNNING" in imported.moorctl("tasks", "ls").stdout
    finally:
        imported.moorctl("tasks", "kill", "-s", "KILL", cid)
        wait_until(lambda: "RUNNING" not in imported.moorctl("tasks", "ls").stdout, 10, "the task to stop")
        imported.moorctl("tasks", "rm", cid)
        imported.moorctl("containers", "rm", cid)
        imported.moorctl("snapshots", "rm", cid)


@needs_failing_criu
def test_the_shims_runc_checkpoint_failure_quotes_criu_and_keeps_its_log(env: TaskEnv, image_dir: str) -> None:
    """Past the runtime's gate (called on the shim directly), runc checkpoint really runs:
    its failure names criu's first error and keeps dump.log in the bundle; the task runs on."""
    from moord.actors.runtime import ShimConnection
    from moord.messages.errors import Internal
    from moord.shims.shim import CRIU_DUMP_LOG, CRIU_WORK_DIR, shim_socket_path

    cid = _counter(env, "shimdump")
    env.create_task(cid)
    pid = int(env.call("tasks.start", container_id=cid)["pid"])
    connection = ShimConnection(shim_socket_path(env.config.state, NS, cid), NS)
    try:
        with pytest.raises(Internal) as failed:
            connection.call("shim.checkpoint", {"path": image_dir, "file_locks": True}, 60)
        kept = os.path.join(env.bundle(cid), CRIU_DUMP_LOG)
        assert failed.value.message.startswith("runc checkpoint: ")
        assert failed.value.message.endswith(f": {CRIU_ERROR} (criu log: {kept})")
        assert CRIU_ERROR in open(kept).read()
        assert not os.path.exists(os.path.join(env.bundle(cid), CRIU_WORK_DIR))
        assert env.get(cid)["status"] == "running"
        before = _count(pid)
        _until(lambda: _count(pid) > before)
    finally:
        connection.close()
        _kill(env, cid)
    env.wait(cid)
    env.call("tasks.delete", container_id=cid)
    assert not os.path.exists(env.bundle(cid))


# -- where CRIU works ------------------------------------------------------------------------


@needs_working_criu
def test_checkpoint_with_exit_then_restore_continues_counting(env: TaskEnv, image_dir: str) -> None:
    cid = _counter(env, "count")
    env.create_task(cid)
    pid = int(env.call("tasks.start", container_id=cid)["pid"])
    _until(lambda: _count(pid) >= 10)
    with pytest.raises(InvalidArgument):
        env.call("tasks.checkpoint", container_id=cid, path="relative/dir")
    reply = env.call("tasks.checkpoint", container_id=cid, path=image_dir, exit=True)
    assert reply["path"] == image_dir and os.listdir(image_dir)
    env.wait(cid)  # CRIU killed the tree after the dump
    assert env.get(cid)["status"] == "stopped"
    topics = [topic for topic, _ in env.topics()]
    assert "/tasks/checkpointed" in topics
    env.call("tasks.delete", container_id=cid)

    # The counter's value lives in the image, not the (tmpfs) file: read it back by restoring.
    created = env.call("tasks.create", container_id=cid, rootfs=env.rootfs_mounts(), checkpoint=image_dir)
    assert created["pid"] == 0 and env.get(cid)["status"] == "created"  # containerd restores at start
    restored = int(env.call("tasks.start", container_id=cid)["pid"])
    try:
        assert env.get(cid)["status"] == "running"
        first = _until(lambda: _count(restored))
        assert first > 10, "the counter started again from 1: not restored"
        _until(lambda: _count(restored) > first)
    finally:
        _kill(env, cid)
    env.wait(cid)
    env.call("tasks.delete", container_id=cid)


@needs_working_criu
def test_checkpoint_leaving_running_and_a_used_path(env: TaskEnv, image_dir: str) -> None:
    cid = _counter(env, "stay")
    env.create_task(cid)
    pid = int(env.call("tasks.start", container_id=cid)["pid"])
    try:
        _until(lambda: _count(pid) >= 3)
        env.call("tasks.checkpoint", container_id=cid, path=image_dir)
        assert env.get(cid)["status"] == "running"
        before = _count(pid)
        _until(lambda: _count(pid) > before)
        with pytest.raises(AlreadyExists):
            env.call("tasks.checkpoint", container_id=cid, path=image_dir)
    finally:
        _kill(env, cid)
    env.wait(cid)
    env.call("tasks.delete", container_id=cid)


@needs_working_criu
def test_moorctl_checkpoint_exit_and_restore(imported: Daemon, image_dir: str) -> None:
    cid = "ck-cli-count"
    assert imported.moorctl("run", "-d", IMAGE, cid, "sh", "-c", COUNTER).returncode == 0
    try:
        time.sleep(1.5)
        result = imported.moorctl("tasks", "checkpoint", "--exit", "--image-path", image_dir, cid)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "RUNNING" not in imported.moorctl("tasks", "ls").stdout, 10, "the task to stop")
        assert imported.moorctl("tasks", "rm", cid).returncode == 0
        restored = imported.moorctl("tasks", "restore", "--image-path", image_dir, cid)
        assert restored.returncode == 0, restored.stderr
        pid = int(restored.stdout.strip())
        assert "RUNNING" in imported.moorctl("tasks", "ls").stdout
        first = _until(lambda: _count(pid))
        assert first > 10
    finally:
        imported.moorctl("tasks", "kill", "-s", "KILL", cid)
        wait_until(lambda: "RUNNING" not in imported.moorctl("tasks", "ls").stdout, 10, "the task to stop")
        imported.moorctl("tasks", "rm", cid)
        imported.moorctl("containers", "rm", cid)
        imported.moorctl("snapshots", "rm", cid)
