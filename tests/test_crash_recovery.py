"""kill -9 of a storage process in the middle of its work, against a real moord.

The supervisor restarts the killed process; what it finds on disk must be a state a
client can carry on from: an ingest resumes at the offset it had reached, a snapshot is
either active or committed (never half of each), a container record is either complete
(its label index included) or absent.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import msgpack
import pytest

from moord.bus.client import Client
from moord.messages.errors import MoordError, NotFound, OutOfRange, FailedPrecondition
from tests.daemon import Daemon, cleanup_base, new_daemon, wait_until

MIB = 1024 * 1024
# What the tests create must outlive collections that deletions set off meanwhile.
PIN = {"containerd.io/gc.root": "crash-test"}
# Several kills per test: more restarts than the default intensity allows in 30 s.
RELAXED_SUPERVISOR = "[supervisor]\nmax_restarts = 100\nmax_seconds = 30.0\n"


@pytest.fixture(scope="module")
def crash_daemon() -> Iterator[Daemon]:
    """A moord for this module that tolerates many restarts of a child (each test kills
    a different process and works in its own refs, keys and namespace)."""
    daemon = new_daemon(RELAXED_SUPERVISOR)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        cleanup_base(daemon.base)


def kill9_child(daemon: Daemon, name: str) -> int:
    """kill -9 one subsystem process; returns the pid it had."""
    pid = daemon.child_pid(name)
    os.kill(pid, 9)
    return pid


def wait_restarted(daemon: Daemon, name: str, old_pid: int, probe: Callable[[], Any], timeout: float = 30.0) -> None:
    """Wait until the supervisor runs `name` under a new pid and `probe` gets an answer."""

    def restarted() -> bool:
        try:
            child = next(c for c in daemon.tree()["children"] if c["name"] == name)
        except MoordError:
            return False
        return child["state"] == "running" and child["pid"] not in (None, 0, old_pid)

    wait_until(restarted, timeout, f"{name} to be restarted")

    def answers() -> bool:
        try:
            probe()
            return True
        except MoordError:
            return False

    wait_until(answers, timeout, f"{name} to answer after its restart", interval=0.1)


# -- content: an ingest survives its process --------------------------------------------------


def _write(client: Client, ref: str, writer: str, offset: int, chunk: bytes, **extra: Any) -> dict[str, Any]:
    return client.call(
        "content.write",
        {"action": "write", "ref": ref, "offset": offset, "writer": writer, **extra},
        frames=[chunk],
        timeout=5.0,
    )


def _finish(client: Client, ref: str, data: bytes, digest: str, offset: int, chunk: int) -> dict[str, Any]:
    """Write data[offset:] in chunks with a new writer session and commit it."""
    writer = uuid.uuid4().hex
    while len(data) - offset > chunk:
        offset = _write(client, ref, writer, offset, data[offset : offset + chunk])["offset"]
    return client.call(
        "content.write",
        {"action": "commit", "ref": ref, "offset": offset, "total": len(data), "expected": digest, "writer": writer,
         "labels": PIN},
        frames=[data[offset:]],
        timeout=30.0,
    )


def test_ingest_resumes_after_kill9_of_content(crash_daemon: Daemon) -> None:
    client = crash_daemon.client(timeout=5.0)
    data = os.urandom(12 * MIB + 4321)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ref = "layer-" + digest
    writer = uuid.uuid4().hex
    stat = client.call(
        "content.write", {"action": "stat", "ref": ref, "total": len(data), "expected": digest, "writer": writer}
    )
    assert stat["offset"] == 0
    offset = 0
    for size in (MIB, 2 * MIB, 4 * MIB):  # the 1-4 MiB chunks a puller sends
        offset = _write(client, ref, writer, offset, data[offset : offset + size])["offset"]
    assert offset == 7 * MIB

    old = kill9_child(crash_daemon, "content")
    wait_restarted(crash_daemon, "content", old, lambda: client.call("content.list_statuses", {}, timeout=2.0))

    status = client.call("content.status", {"ref": ref})["status"]
    assert status["offset"] == 7 * MIB
    assert status["total"] == len(data) and status["expected"] == digest
    assert [s["ref"] for s in client.call("content.list_statuses", {})["statuses"]] == [ref]
    with pytest.raises(OutOfRange):  # a resume must continue where the data ends
        _write(client, ref, uuid.uuid4().hex, 3 * MIB, data[3 * MIB : 4 * MIB])

    reply = _finish(client, ref, data, digest, status["offset"], 4 * MIB)
    assert reply["digest"] == digest and reply["offset"] == len(data)
    with pytest.raises(NotFound):
        client.call("content.status", {"ref": ref})
    assert client.call("content.info", {"digest": digest})["info"]["size"] == len(data)
    blob = os.path.join(crash_daemon.root, "io.containerd.content.v1.content", "blobs", "sha256", digest[7:])
    with open(blob, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == digest[7:]


def test_ingest_killed_mid_write_resumes_from_what_reached_disk(crash_daemon: Daemon) -> None:
    """A kill while chunks are in flight: the status offset is where the file ends, and
    the bytes before it are the writer's (commit checks the digest over all of them)."""
    client = crash_daemon.client(timeout=5.0)
    for iteration in range(3):
        data = os.urandom(48 * MIB + iteration)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        ref = f"mid-write-{iteration}"
        stop = threading.Event()
        failures: list[BaseException] = []

        def pump() -> None:
            writer, offset = uuid.uuid4().hex, 0
            writes = Client(crash_daemon.ipc_dir, timeout=5.0)
            try:
                while not stop.is_set() and offset < len(data):
                    offset = _write(writes, ref, writer, offset, data[offset : offset + 2 * MIB], total=len(data))["offset"]
            except MoordError as exc:
                failures.append(exc)  # expected: the process went away under us

        thread = threading.Thread(target=pump)
        thread.start()
        try:
            wait_until(lambda: _offset(client, ref) >= 4 * MIB, 20, "the first chunks to land")
            time.sleep(random.uniform(0.0, 0.05))
            old = kill9_child(crash_daemon, "content")
        finally:
            stop.set()
            thread.join(30)
        wait_restarted(crash_daemon, "content", old, lambda: client.call("content.list_statuses", {}, timeout=2.0))

        status = client.call("content.status", {"ref": ref})["status"]
        assert 0 < status["offset"] <= len(data)
        reply = _finish(client, ref, data, digest, status["offset"], 3 * MIB)
        assert reply["digest"] == digest

        # The commit checks the digest: a resume with other bytes cannot pass as the blob.
        other = os.urandom(2 * MIB)
        other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
        _write(client, "forged", "forger", 0, other[:MIB], total=len(other), expected=other_digest)
        with pytest.raises(FailedPrecondition):
            client.call(
                "content.write",
                {"action": "commit", "ref": "forged", "offset": MIB, "total": len(other), "writer": "forger",
                 "expected": other_digest},
                frames=[os.urandom(MIB)],
            )
        client.call("content.abort", {"ref": "forged"})


def _offset(client: Client, ref: str) -> int:
    try:
        return int(client.call("content.status", {"ref": ref}, timeout=2.0)["status"]["offset"])
    except NotFound:
        return 0


# -- snapshotter: commit is all or nothing ---------------------------------------------------


class CommitHammer:
    """Threads that prepare, fill and commit snapshots until told to stop."""

    def __init__(self, daemon: Daemon, namespace: str, tag: str, threads: int = 2) -> None:
        self.daemon = daemon
        self.namespace = namespace
        self.tag = tag
        self.stop = threading.Event()
        self.committed: set[str] = set()  # commits that returned success
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> "CommitHammer":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        client = Client(self.daemon.ipc_dir, namespace=self.namespace, timeout=3.0)
        n = 0
        while not self.stop.is_set():
            n += 1
            key = f"{self.tag}-{index}-{n}"
            try:
                mounts = client.call("snapshots.prepare", {"key": f"active-{key}", "parent": "", "labels": PIN})["mounts"]
                upper = mounts[0]["source"]  # no parent: a bind of the snapshot's own fs
                with open(os.path.join(upper, "marker"), "w") as fh:
                    fh.write(key)
                client.call("snapshots.commit", {"name": f"committed-{key}", "key": f"active-{key}", "labels": PIN})
            except (MoordError, OSError):
                continue  # the snapshotter is down, or its dir went with it: try the next key
            with self.lock:
                self.committed.add(f"committed-{key}")


def _check_snapshots(daemon: Daemon, client: Client, acknowledged: set[str]) -> None:
    """Every record is active or committed, with its directory; list and stat agree."""
    infos = client.call("snapshots.list", {})["info"]
    names = {i["name"] for i in infos}
    assert acknowledged <= names, f"acknowledged commits lost: {sorted(acknowledged - names)[:5]}"
    for info in infos:
        assert info["kind"] in ("active", "committed"), info
        assert client.call("snapshots.stat", {"key": info["name"]})["info"] == info
        tag = info["name"].split("-", 1)[1]
        twin = ("committed-" if info["kind"] == "active" else "active-") + tag
        assert twin not in names, f"{info['name']} is both active and committed"
        assert info["name"].startswith("active-" if info["kind"] == "active" else "committed-")
        if info["kind"] == "active":
            source = client.call("snapshots.mounts", {"key": info["name"]})["mounts"][0]["source"]
            assert os.path.isdir(source) and os.path.isdir(os.path.join(os.path.dirname(source), "work"))
        else:
            # a view of a committed snapshot binds its fs: the file written before commit is there
            view = f"check-{tag}"
            source = client.call("snapshots.view", {"key": view, "parent": info["name"], "labels": PIN})["mounts"][0]["source"]
            try:
                with open(os.path.join(source, "marker")) as fh:
                    assert fh.read() == tag
            finally:
                client.call("snapshots.remove", {"key": view})
            usage = client.call("snapshots.usage", {"key": info["name"]})
            assert usage["inodes"] >= 2
    # On disk: no temp dirs; after Cleanup exactly one directory per record.
    snapshots_dir = os.path.join(daemon.root, "io.containerd.snapshotter.v1.overlayfs", "snapshots")
    assert not [d for d in os.listdir(snapshots_dir) if d.startswith("new-")]
    client.call("snapshots.cleanup", {})
    assert len(os.listdir(snapshots_dir)) == len(infos)


def test_no_half_committed_snapshot_after_kill9_during_commit(crash_daemon: Daemon) -> None:
    client = crash_daemon.client("crash", timeout=5.0)
    acknowledged: set[str] = set()
    for iteration in range(5):
        with CommitHammer(crash_daemon, "crash", f"i{iteration}") as hammer:
            wait_until(lambda: len(hammer.committed) >= 3, 30, "commits to flow")
            time.sleep(random.uniform(0.05, 0.4))
            old = kill9_child(crash_daemon, "snapshotter")
            # keep hammering into the restart: requests must fail cleanly, not corrupt
            time.sleep(0.3)
        acknowledged |= hammer.committed
        wait_restarted(crash_daemon, "snapshotter", old, lambda: client.call("snapshots.list", {}, timeout=2.0))
        _check_snapshots(crash_daemon, client, acknowledged)
        # and it still serves: a new layer on top of one of the survivors
        parent = sorted(acknowledged)[0]
        client.call("snapshots.prepare", {"key": f"after-{iteration}", "parent": parent, "labels": PIN})
        client.call("snapshots.remove", {"key": f"after-{iteration}"})


# -- metadata: a transaction is all or nothing -----------------------------------------------


LABELS_PER_CONTAINER = 12


def _container(cid: str, group: str) -> dict[str, Any]:
    labels = {f"k{j}": f"{cid}-{j}" for j in range(LABELS_PER_CONTAINER)}
    labels["group"] = group
    return {
        "id": cid,
        "labels": labels,
        "image": "docker.io/library/busybox:latest",
        "runtime": {"name": "io.containerd.runc.v2"},
        "spec": b'{"ociVersion": "1.0.2", "id": "' + cid.encode() + b'"}',
        "snapshotter": "overlayfs",
        "snapshot_key": cid,
    }


class CreateStorm:
    """Threads creating containers (each with a dozen labels) until told to stop."""

    def __init__(self, daemon: Daemon, namespace: str, tag: str, threads: int = 4) -> None:
        self.daemon = daemon
        self.namespace = namespace
        self.tag = tag
        self.stop = threading.Event()
        self.created: dict[str, dict[str, Any]] = {}
        self.attempted: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> "CreateStorm":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        client = Client(self.daemon.ipc_dir, namespace=self.namespace, timeout=3.0)
        n = 0
        while not self.stop.is_set():
            n += 1
            cid = f"{self.tag}-{index}-{n}"
            record = _container(cid, f"g{n % 3}")
            with self.lock:
                self.attempted[cid] = record
            try:
                client.call("containers.create", {"container": record})
            except MoordError:
                continue
            with self.lock:
                self.created[cid] = record


def _check_containers(daemon: Daemon, client: Client, storm_created: dict[str, Any], attempted: dict[str, Any]) -> None:
    listed = {c["id"]: c for c in client.call("containers.list", {})["containers"]}
    assert set(storm_created) <= set(listed), f"acknowledged creates lost: {sorted(set(storm_created) - set(listed))[:5]}"
    assert set(listed) <= set(attempted)
    for cid, container in listed.items():
        sent = attempted[cid]
        assert container["labels"] == sent["labels"], cid
        assert container["spec"] == sent["spec"] and container["snapshot_key"] == cid
        assert client.call("containers.get", {"id": cid})["container"] == container

    # The label side table matches each record's own labels, row for row.
    db = sqlite3.connect(os.path.join(daemon.root, "io.containerd.metadata.v1.sqlite", "meta.db"))
    try:
        records = {
            cid: msgpack.unpackb(blob, raw=False)
            for cid, blob in db.execute("SELECT id, labels FROM containers WHERE namespace = 'crash'")
        }
        indexed: dict[str, dict[str, str]] = {}
        for cid, key, value in db.execute("SELECT id, key, value FROM container_labels WHERE namespace = 'crash'"):
            indexed.setdefault(cid, {})[key] = value
    finally:
        db.close()
    assert set(records) == set(listed)
    assert {cid: labels for cid, labels in records.items() if labels} == indexed

    # Filtered lists (answered from the label table in SQL) agree with Python's filtering.
    for group in ("g0", "g1", "g2"):
        by_daemon = {c["id"] for c in client.call("containers.list", {"filters": [f"labels.group=={group}"]})["containers"]}
        by_hand = {cid for cid, c in listed.items() if c["labels"].get("group") == group}
        assert by_daemon == by_hand
        shown = daemon.moorctl("-n", "crash", "containers", "ls", f"labels.group=={group}")
        assert shown.returncode == 0, shown.stderr
        assert {line.split()[0] for line in shown.stdout.splitlines()[1:]} == by_hand
    either = client.call("containers.list", {"filters": ["labels.group==g0", "labels.k3~=-3$,labels.group==g2"]})
    assert {c["id"] for c in either["containers"]} == {
        cid for cid, c in listed.items() if c["labels"]["group"] in ("g0", "g2")
    }


def test_metadata_consistent_after_kill9_mid_transaction(crash_daemon: Daemon) -> None:
    client = crash_daemon.client("crash", timeout=5.0)
    created: dict[str, Any] = {}
    attempted: dict[str, Any] = {}
    for iteration in range(4):
        with CreateStorm(crash_daemon, "crash", f"i{iteration}") as storm:
            wait_until(lambda: len(storm.created) >= 20, 30, "creates to flow")
            time.sleep(random.uniform(0.05, 0.3))
            old = kill9_child(crash_daemon, "metadata")
            time.sleep(0.3)
        created.update(storm.created)
        attempted.update(storm.attempted)
        wait_restarted(crash_daemon, "metadata", old, lambda: client.call("containers.list", {"filters": ["id==x"]}, timeout=2.0))
        _check_containers(crash_daemon, client, created, attempted)
