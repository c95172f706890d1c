"""What a user sees: moorctl imports busybox, runs containers, gets their exit codes,
and running containers outlive crashes of the runtime process and of the daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.daemon import Daemon, moorctl_argv, wait_until

IMAGE = "docker.io/library/busybox:latest"


def test_images_ls_shows_the_imported_image(imported: Daemon) -> None:
    result = imported.moorctl("images", "ls")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["REF", "TYPE", "DIGEST", "SIZE", "LABELS"]
    assert IMAGE in result.stdout
    assert imported.moorctl("images", "ls", "-q").stdout.split() == [IMAGE]


def test_run_prints_hello(imported: Daemon) -> None:
    result = imported.moorctl("run", "--rm", IMAGE, "hello", "echo", "hello")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello\n", "")


def test_run_passes_stderr_and_the_exit_code(imported: Daemon) -> None:
    result = imported.moorctl("run", "--rm", IMAGE, "seven", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == "out\n" and result.stderr == "err\n"


def test_run_after_double_dash_and_env(imported: Daemon) -> None:
    result = imported.moorctl("run", "--rm", "--env", "GREETING=hi", IMAGE, "dd", "--", "sh", "-c", "echo $GREETING")
    assert (result.returncode, result.stdout) == (0, "hi\n")


def test_killed_container_exits_137(imported: Daemon) -> None:
    runner = subprocess.Popen(
        moorctl_argv(imported.config_path, "run", "--rm", IMAGE, "victim", "sleep", "100"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: "victim" in imported.moorctl("tasks", "ls").stdout, 20, "the task to run")
        kill = imported.moorctl("kill", "-s", "KILL", "victim")
        assert kill.returncode == 0, kill.stderr
        assert runner.wait(30) == 137
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_run_rm_leaves_nothing_behind(imported: Daemon) -> None:
    assert imported.moorctl("run", "--rm", IMAGE, "tidy", "true").returncode == 0
    assert "tidy" not in imported.moorctl("containers", "ls").stdout
    assert "tidy" not in imported.moorctl("snapshots", "ls").stdout
    assert "tidy" not in imported.moorctl("tasks", "ls").stdout
    with open("/proc/self/mountinfo") as fh:
        assert not [line for line in fh if imported.base in line and "tidy" in line]


def test_unknown_image_is_a_clear_error(imported: Daemon) -> None:
    result = imported.moorctl("run", "--rm", "docker.io/library/nothing:here", "nope", "true")
    assert result.returncode == 1
    assert "not_found" in result.stderr and "nothing:here" in result.stderr


def _wait_exit(daemon: Daemon, container_id: str) -> int:
    reply = daemon.client(timeout=30).call("tasks.wait", {"container_id": container_id}, timeout=30)
    return int(reply["exit_status"])


def _cleanup(daemon: Daemon, container_id: str) -> None:
    daemon.moorctl("tasks", "rm", container_id)
    daemon.moorctl("containers", "rm", container_id)


def test_running_container_survives_kill9_of_the_runtime(imported: Daemon) -> None:
    daemon = imported
    started = daemon.moorctl("run", "-d", IMAGE, "survivor", "sh", "-c", "sleep 3; exit 4")
    assert started.returncode == 0, started.stderr
    init_pid = next(t for t in daemon.client().call("tasks.list")["tasks"] if t["container_id"] == "survivor")["pid"]
    runtime_pid = daemon.child_pid("runtime")
    os.kill(runtime_pid, signal.SIGKILL)
    wait_until(lambda: daemon.child_pid("runtime") not in (0, runtime_pid), 30, "runtime to restart")
    assert os.path.exists(f"/proc/{init_pid}")  # the container never noticed
    task = next(t for t in daemon.client().call("tasks.list")["tasks"] if t["container_id"] == "survivor")
    assert task["status"] == "running" and task["pid"] == init_pid
    assert _wait_exit(daemon, "survivor") == 4
    _cleanup(daemon, "survivor")


def test_running_container_survives_kill9_of_the_root(fresh_daemon: Daemon, busybox_layout: str) -> None:
    daemon = fresh_daemon
    assert daemon.moorctl("images", "import", busybox_layout).returncode == 0
    assert daemon.moorctl("run", "-d", IMAGE, "longer", "sh", "-c", "sleep 30; exit 6").returncode == 0
    assert daemon.moorctl("run", "-d", IMAGE, "shorter", "sh", "-c", "sleep 1; exit 9").returncode == 0
    pids = {t["container_id"]: t["pid"] for t in daemon.client().call("tasks.list")["tasks"]}
    daemon.kill9()
    time.sleep(1.5)  # "shorter" exits while no daemon runs
    assert os.path.exists(f"/proc/{pids['longer']}")
    daemon.start()
    tasks = {t["container_id"]: t for t in daemon.client().call("tasks.list")["tasks"]}
    assert tasks["longer"]["status"] == "running" and tasks["longer"]["pid"] == pids["longer"]
    assert tasks["shorter"]["status"] == "stopped"
    assert _wait_exit(daemon, "shorter") == 9
    assert daemon.moorctl("kill", "-s", "KILL", "longer").returncode == 0
    assert _wait_exit(daemon, "longer") == 137
    for cid in ("longer", "shorter"):
        _cleanup(daemon, cid)


def test_import_of_a_layout_tar(fresh_daemon: Daemon, tmp_path) -> None:
    from moord.oci.busybox import build_busybox_layout

    tar = str(tmp_path / "busybox.tar")
    build_busybox_layout(tar, ref="docker.io/library/busybox:tarred", tar=True)
    result = fresh_daemon.moorctl("images", "import", tar)
    assert result.returncode == 0, result.stderr
    assert "docker.io/library/busybox:tarred" in fresh_daemon.moorctl("images", "ls", "-q").stdout
    run = fresh_daemon.moorctl("run", "--rm", "docker.io/library/busybox:tarred", "from-tar", "echo", "tar ok")
    assert (run.returncode, run.stdout) == (0, "tar ok\n")


def test_sigterm_of_the_daemon_leaves_containers_running(fresh_daemon: Daemon, busybox_layout: str) -> None:
    daemon = fresh_daemon
    assert daemon.moorctl("images", "import", busybox_layout).returncode == 0
    assert daemon.moorctl("run", "-d", IMAGE, "stays", "sleep", "60").returncode == 0
    pid = next(t["pid"] for t in daemon.client().call("tasks.list")["tasks"] if t["container_id"] == "stays")
    assert daemon.stop() == 0  # SIGTERM: the tree stops in order
    assert os.path.exists(f"/proc/{pid}")
    daemon.start()
    task = next(t for t in daemon.client().call("tasks.list")["tasks"] if t["container_id"] == "stays")
    assert (task["status"], task["pid"]) == ("running", pid)
    assert daemon.moorctl("kill", "-s", "KILL", "stays").returncode == 0
    assert _wait_exit(daemon, "stays") == 137
    _cleanup(daemon, "stays")


def test_shim_endpoint_survives_malformed_frames(imported: Daemon) -> None:
    import glob

    import msgpack
    import zmq

    from moord.messages import envelope as codec

    assert imported.moorctl("run", "-d", IMAGE, "probed", "sleep", "60").returncode == 0
    try:
        [address_file] = glob.glob(os.path.join(imported.state, "io.containerd.runtime.v2.task", "default", "probed", "address"))
        address = open(address_file).read().strip()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address if address.startswith("ipc://") else f"ipc://{address}")
        try:
            for frames in (
                [b"\xc1garbage"],
                [codec.request_frame("u", "nosuch.kind", {})],
                [codec.request_frame("v", "shim.kill", {"signal": 999})],
                [codec.request_frame("b", "shim.state", {}), b"\0" * (codec.MAX_MESSAGE_BYTES + 1)],
            ):
                sock.send_multipart(frames)
                assert sock.poll(5000), "the shim did not answer"
                assert msgpack.unpackb(sock.recv_multipart()[0])["kind"] == "error"
        finally:
            sock.close()
        task = next(t for t in imported.client().call("tasks.list")["tasks"] if t["container_id"] == "probed")
        assert task["status"] == "running"
    finally:
        imported.moorctl("kill", "-s", "KILL", "probed")
        _wait_exit(imported, "probed")
        _cleanup(imported, "probed")


def test_a_run_publishes_containerds_events(imported: Daemon) -> None:
    from moord.bus.events import EventSubscriber

    subscriber = EventSubscriber(imported.ipc_dir)
    try:
        time.sleep(0.3)  # let the subscription reach the exchange
        assert imported.moorctl("run", "--rm", IMAGE, "evented", "sh", "-c", "exit 3").returncode == 3
        seen: list[tuple[str, dict]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(t == "/containers/delete" for t, _ in seen):
            event = subscriber.receive(1)
            if event and event["ns"] == "default":
                seen.append((event["topic"], event["event"]))
    finally:
        subscriber.close()
    topics = [t for t, e in seen if e.get("container_id", e.get("id", e.get("key"))) in ("evented", None) or t.startswith("/snapshot")]
    order = ["/snapshot/prepare", "/containers/create", "/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete", "/snapshot/remove", "/containers/delete"]
    assert [t for t in topics if t in order] == order, seen
    exit_event = next(e for t, e in seen if t == "/tasks/exit")
    assert exit_event["exit_status"] == 3 and exit_event["container_id"] == "evented" and exit_event["pid"] > 0


def test_run_forwards_stdin_until_eof(imported: Daemon) -> None:
    result = subprocess.run(
        moorctl_argv(imported.config_path, "run", "--rm", IMAGE, "stdin-cat", "sh", "-c", "cat; echo done"),
        input="line one\nline two\n", capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "line one\nline two\ndone\n"), result.stderr


def test_run_options_reach_the_container(imported: Daemon, tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "note").write_text("from the host\n")
    script = "echo $GREETING; pwd; id -u; id -g; hostname; cat /data/note; touch /data/x || echo data-ro; touch /y || echo root-ro"
    result = imported.moorctl(
        "run", "--rm", "--env", "GREETING=hi", "--cwd", "/tmp", "--user", "65534:65534", "--hostname", "box",
        "--read-only", "--mount", f"type=bind,src={shared},dst=/data,options=rbind:ro",
        IMAGE, "opts", "sh", "-c", script,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hi", "/tmp", "65534", "65534", "box", "from the host", "data-ro", "root-ro"]
    assert not (shared / "x").exists()


def test_bad_run_options_are_clear_errors(imported: Daemon) -> None:
    both = imported.moorctl("run", "-d", "--rm", IMAGE, "both", "true")
    assert both.returncode == 1 and "--rm" in both.stderr
    mount = imported.moorctl("run", "--rm", "--mount", "type=bind,src=relative,dst=/x", IMAGE, "badmount", "true")
    assert mount.returncode == 1 and "absolute" in mount.stderr
    assert "both" not in imported.moorctl("containers", "ls").stdout


def test_memory_limit_and_tasks_start_of_a_kept_container(imported: Daemon) -> None:
    try:
        assert imported.moorctl("run", "-d", "--memory-limit", str(64 << 20), IMAGE, "limited", "sleep", "60").returncode == 0
        import json

        metrics = json.loads(imported.moorctl("tasks", "metrics", "--format", "json", "limited").stdout)
        assert metrics["memory"]["limit"] == 64 << 20
    finally:
        imported.moorctl("kill", "-s", "KILL", "limited")
        _wait_exit(imported, "limited")
        _cleanup(imported, "limited")
    try:
        first = imported.moorctl("run", IMAGE, "kept", "sh", "-c", "echo again; exit 2")
        assert (first.returncode, first.stdout) == (2, "again\n")
        second = imported.moorctl("tasks", "start", "kept")
        assert (second.returncode, second.stdout) == (2, "again\n"), second.stderr
        assert "kept" not in imported.moorctl("tasks", "ls").stdout
    finally:
        _cleanup(imported, "kept")


def test_runc_binary_selects_crun(imported: Daemon) -> None:
    import shutil

    if shutil.which("crun") is None:
        import pytest

        pytest.skip("crun is not installed")
    result = imported.moorctl("run", "--rm", "--runc-binary", "crun", IMAGE, "on-crun", "echo", "crun ok")
    assert (result.returncode, result.stdout) == (0, "crun ok\n"), result.stderr
    via_name = imported.moorctl("run", "--rm", "--runtime", "io.containerd.crun.v2", IMAGE, "on-crun2", "echo", "ok")
    assert (via_name.returncode, via_name.stdout) == (0, "ok\n"), via_name.stderr
