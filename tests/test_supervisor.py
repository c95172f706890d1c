"""The supervision tree as an operator sees it: restarts, escalation, systemd, config."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import msgpack
import psutil
import pytest
import zmq

from moord.messages import envelope as codec
from tests.daemon import Daemon, cleanup_base, new_daemon, wait_until

SUBSYSTEMS = ["events", "metadata", "content", "snapshotter", "images", "runtime"]


def restarted(daemon: Daemon, name: str, old_pid: int, restarts: int) -> bool:
    try:
        for child in daemon.tree()["children"]:
            if child["name"] == name:
                return child["state"] == "running" and child["pid"] not in (0, old_pid) and child["restarts"] >= restarts
    except Exception:
        return False
    return False


def test_tree_shows_every_subsystem_running(daemon: Daemon) -> None:
    result = daemon.moorctl("tree")
    assert result.returncode == 0, result.stderr
    for name in SUBSYSTEMS:
        line = next(line for line in result.stdout.splitlines() if line.startswith(name + " "))
        assert " running " in line
    for child in daemon.tree()["children"]:
        title = " ".join(psutil.Process(child["pid"]).cmdline())
        assert title.startswith(f"moord: {child['name']}"), title


def test_process_titles_read_like_the_diagram(daemon: Daemon) -> None:
    root = psutil.Process(daemon.tree()["pid"])
    assert root.cmdline()[0] == "moord"
    names = sorted(" ".join(p.cmdline()).strip() for p in root.children())
    assert names == sorted(f"moord: {n}" for n in SUBSYSTEMS)


def test_notify_ready_and_status(daemon: Daemon) -> None:
    assert any("READY=1" in m for m in daemon.notifications)
    assert any("STATUS=" in m for m in daemon.notifications)


@pytest.mark.parametrize("name", SUBSYSTEMS)
def test_kill9_of_a_subsystem_restarts_it_and_run_still_works(imported: Daemon, name: str) -> None:
    daemon = imported
    before = {c["name"]: c for c in daemon.tree()["children"]}
    old_pid = before[name]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: restarted(daemon, name, old_pid, before[name]["restarts"] + 1), 30, f"{name} to restart")
    tree = daemon.moorctl("tree").stdout
    line = next(line for line in tree.splitlines() if line.startswith(name + " "))
    assert re.search(rf"^{name}\s+\d+\s+running\s+{before[name]['restarts'] + 1}\s", line), tree
    after = {c["name"]: c["pid"] for c in daemon.tree()["children"]}
    for other in SUBSYSTEMS:  # one_for_one: nobody else was touched
        if other != name:
            assert after[other] == before[other]["pid"]
    result = daemon.moorctl("run", "--rm", "docker.io/library/busybox:latest", f"after-{name}", "echo", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"


@pytest.mark.parametrize("name", ["supervisor"] + SUBSYSTEMS)
def test_every_endpoint_survives_malformed_frames(daemon: Daemon, name: str) -> None:
    path = os.path.join(daemon.ipc_dir, f"{name}.sock")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{path}")
    try:
        for frames in (
            [b"\xc1\x00\xff"],
            [msgpack.packb("just a string")],
            [codec.request_frame("k", "nosuch.kind", {})],
            [codec.request_frame("big", "system.ping", {}), b"\0" * (codec.MAX_MESSAGE_BYTES + 10)],
        ):
            sock.send_multipart(frames)
            assert sock.poll(5000), f"{name} did not answer {frames[0][:20]!r}"
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert reply["kind"] == "error"
        sock.send_multipart([codec.request_frame("p", "system.ping", {})])
        assert sock.poll(5000)
        assert msgpack.unpackb(sock.recv_multipart()[0])["payload"]["process"] == name
    finally:
        sock.close()


def test_stopped_daemon_answers_unavailable_quickly() -> None:
    d = new_daemon()
    try:
        started = time.monotonic()
        result = d.moorctl("images", "ls", timeout=30)
        assert result.returncode == 1
        assert "unavailable" in result.stderr
        assert time.monotonic() - started < 5
    finally:
        cleanup_base(d.base)


def test_sigterm_stops_children_in_reverse_order() -> None:
    d = new_daemon()
    try:
        d.start()
        pids = {c["name"]: c["pid"] for c in d.tree()["children"]}
        d.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        d.wait_notification("STOPPING=1", 30)
        assert d.stop() == 0
        for pid in pids.values():
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        stops = [m.group(1) for m in re.finditer(r"moord\[(\w+):\d+\] INFO moord.child: stopping", d.log())]
        assert stops == list(reversed(SUBSYSTEMS))
    finally:
        d.stop()
        cleanup_base(d.base)


def test_watchdog_pings_when_asked() -> None:
    d = new_daemon()
    try:
        os.environ["WATCHDOG_USEC"] = "200000"
        try:
            d.start()
        finally:
            del os.environ["WATCHDOG_USEC"]
        d.wait_notification("WATCHDOG=1", 5)
    finally:
        d.stop()
        cleanup_base(d.base)


def test_crash_loop_escalates_without_a_fork_storm() -> None:
    d = new_daemon("[supervisor]\nmax_restarts = 3\nmax_seconds = 60\nbackoff_initial = 0.05\n")
    try:
        d.start()
        snap_pid = d.child_pid("snapshotter")
        others = [c["pid"] for c in d.tree()["children"]]
        # From now on the snapshotter cannot start: its root is a file.
        snap_root = os.path.join(d.root, "io.containerd.snapshotter.v1.overlayfs")
        subprocess.run(["rm", "-rf", snap_root], check=True)
        open(snap_root, "w").close()
        os.kill(snap_pid, signal.SIGKILL)
        assert d.process is not None
        status = d.process.wait(60)
        assert status == 1
        log = d.log()
        assert re.search(r"child snapshotter exceeded the restart intensity \(3 restarts in 60s\)", log), log
        attempts = len(re.findall(r"restarting snapshotter in", log))
        assert attempts == 3
        # backoff: attempts were spaced, doubling from 50 ms
        delays = [float(x) for x in re.findall(r"restarting snapshotter in ([\d.]+)s", log)]
        assert delays == sorted(delays) and delays[-1] >= 0.1
        for pid in others:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        d.stop()
        cleanup_base(d.base)


def test_rest_for_one_restarts_the_later_children() -> None:
    d = new_daemon('[supervisor]\nstrategy = "rest_for_one"\n')
    try:
        d.start()
        before = {c["name"]: c["pid"] for c in d.tree()["children"]}
        os.kill(before["content"], signal.SIGKILL)
        later = SUBSYSTEMS[SUBSYSTEMS.index("content") :]

        def all_back() -> bool:
            tree = {c["name"]: c for c in d.tree()["children"]}
            return all(tree[n]["state"] == "running" and tree[n]["pid"] not in (0, before[n]) for n in later)

        wait_until(all_back, 30, "content and the children after it to restart")
        after = {c["name"]: c["pid"] for c in d.tree()["children"]}
        assert after["events"] == before["events"] and after["metadata"] == before["metadata"]
    finally:
        d.stop()
        cleanup_base(d.base)


def test_second_daemon_on_the_same_state_is_refused(daemon: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moord.supervisor.main", "--config", daemon.config_path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "another moord" in result.stderr


def test_config_default_and_dump(tmp_path) -> None:
    default = subprocess.run([sys.executable, "-m", "moord.supervisor.main", "config", "default"], capture_output=True, text=True)
    assert default.returncode == 0
    assert 'root = "/var/lib/moord"' in default.stdout and "[plugins.runtime]" in default.stdout
    cfg = tmp_path / "c.toml"
    cfg.write_text('root = "/srv/moord"\n[plugins.runtime]\nbinary = "crun"\n')
    dump = subprocess.run(
        [sys.executable, "-m", "moord.supervisor.main", "--config", str(cfg), "config", "dump"], capture_output=True, text=True
    )
    assert 'root = "/srv/moord"' in dump.stdout and 'binary = "crun"' in dump.stdout
    assert 'state = "/run/moord"' in dump.stdout


@pytest.mark.parametrize(
    "text, words",
    [
        ('root = "relative/path"\n', ["'root'", "absolute"]),
        ("[supervisor]\nmax_restarts = -1\n", ["'supervisor.max_restarts'", "greater than or equal"]),
        ('[supervisor]\nstrategy = "all_for_none"\n', ["'supervisor.strategy'", "one_for_one"]),
        ("[grpc]\nadress = 'typo'\n", ["'grpc.adress'", "Extra inputs"]),
        ("root = [\n", ["not valid TOML"]),
    ],
)
def test_invalid_config_is_refused_naming_the_key(tmp_path, text: str, words: list[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "moord.supervisor.main", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    for word in words:
        assert word in result.stderr, result.stderr
