"""kill -9 of the root daemon with 10 running containers (issue 5's "must show").

After the restart all 10 are RUNNING again with their original pids, and a container
that exited while no daemon ran reports its real exit code. The runtime re-attaches to
every shim in parallel; the test prints how long that took (from the runtime's log).
"""

from __future__ import annotations

import re
import time

from tests.daemon import Daemon, wait_until

IMAGE = "docker.io/library/busybox:latest"
RUNNING = [f"c{i}" for i in range(10)]
QUICK = "quick"
REATTACHED = re.compile(r"re-attached to (\d+) bundles in ([0-9.]+) ms")


def _tasks_ls(daemon: Daemon) -> dict[str, tuple[int, str]]:
    """`moorctl tasks ls` parsed: id -> (pid, STATUS)."""
    result = daemon.moorctl("tasks", "ls")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    return {row[0]: (int(row[1]), row[2]) for row in rows}


def _wait_exit(daemon: Daemon, container_id: str) -> int:
    """tasks.wait's exit status."""
    return int(daemon.client(timeout=30).call("tasks.wait", {"container_id": container_id})["exit_status"])


def test_ten_containers_survive_kill9_of_the_root(fresh_daemon: Daemon, busybox_layout: str) -> None:
    daemon = fresh_daemon
    imported = daemon.moorctl("images", "import", busybox_layout)
    assert imported.returncode == 0, imported.stderr
    for cid in RUNNING:
        result = daemon.moorctl("run", "-d", IMAGE, cid, "sleep", "60")
        assert result.returncode == 0, result.stderr
    result = daemon.moorctl("run", "-d", IMAGE, QUICK, "sh", "-c", "sleep 1; exit 7")
    assert result.returncode == 0, result.stderr
    before = _tasks_ls(daemon)
    assert all(before[cid][1] == "RUNNING" for cid in RUNNING), before

    daemon.kill9()
    time.sleep(2)  # QUICK exits while no daemon runs
    started = time.monotonic()
    daemon.start()
    ready_ms = (time.monotonic() - started) * 1000

    after = _tasks_ls(daemon)
    for cid in RUNNING:
        assert after[cid] == (before[cid][0], "RUNNING"), (cid, after.get(cid))
    assert after[QUICK][1] == "STOPPED", after.get(QUICK)
    assert _wait_exit(daemon, QUICK) == 7

    found = wait_until(lambda: REATTACHED.findall(daemon.log()), 10, "the runtime's re-attach log line")
    bundles, reattach_ms = found[-1]
    assert int(bundles) == len(RUNNING) + 1
    print(f"\nre-attach: {bundles} bundles in {float(reattach_ms):.1f} ms (runtime log); restart to READY=1: {ready_ms:.0f} ms")

    for cid in RUNNING:
        killed = daemon.moorctl("kill", "-s", "KILL", cid)
        assert killed.returncode == 0, killed.stderr
    for cid in RUNNING:
        assert _wait_exit(daemon, cid) == 137
    for cid in [*RUNNING, QUICK]:
        removed = daemon.moorctl("tasks", "rm", cid)
        assert removed.returncode == 0, removed.stderr
        removed = daemon.moorctl("containers", "rm", cid)
        assert removed.returncode == 0, removed.stderr
    assert _tasks_ls(daemon) == {}
