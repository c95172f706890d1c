"""Leases against a real daemon: the API, what a lease holds, expiry reaped on an idle daemon.

The daemon here collects only when asked (a tiny pause_threshold stretches the scheduler's
interval) or when a lease expires, so each `gc.run` report is this test's own.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Iterator

import pytest

from moord.messages.errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from tests.daemon import Daemon, cleanup_base, new_daemon, wait_until
from tests.test_gc import blob_path, snapshot_dirs

QUIET_GC = "[plugins.gc]\npause_threshold = 0.00001\nstartup_delay = 0.0\n"
EXPIRE = "containerd.io/gc.expire"


@pytest.fixture(scope="module")
def quiet_daemon() -> Iterator[Daemon]:
    """A daemon whose collector runs on request and at expiries only."""
    daemon = new_daemon(QUIET_GC)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        cleanup_base(daemon.base)


def rfc3339(stamp: float) -> str:
    """UTC RFC 3339, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def write_blob(daemon: Daemon, data: bytes, lease: str = "", namespace: str = "default") -> str:
    """Commit `data` to the content store in one request, under `lease`; returns its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    daemon.client(namespace).call(
        "content.write",
        {"action": "commit", "ref": f"test-{digest[7:19]}", "total": len(data), "expected": digest},
        frames=[data],
        lease=lease,
    )
    return digest


def test_lease_api(quiet_daemon: Daemon) -> None:
    """create (id or generated), list with filters, resources, errors as containerd's."""
    client = quiet_daemon.client()
    made = client.call("leases.create", {"id": "api-1", "labels": {"team": "a", "x": ""}})["lease"]
    assert made["id"] == "api-1" and made["labels"] == {"team": "a"} and made["created_at"] > 0
    generated = client.call("leases.create", {})["lease"]["id"]
    assert generated and generated != "api-1"
    with pytest.raises(AlreadyExists):
        client.call("leases.create", {"id": "api-1"})
    with pytest.raises(InvalidArgument):
        client.call("leases.create", {"id": "has space"})
    ids = [lease["id"] for lease in client.call("leases.list", {"filters": ["labels.team==a"]})["leases"]]
    assert ids == ["api-1"]
    assert [x["id"] for x in client.call("leases.list", {"filters": [f"id=={generated}"]})["leases"]] == [generated]
    with pytest.raises(InvalidArgument):
        client.call("leases.list", {"filters": ["id=="]})
    digest = "sha256:" + "a" * 64
    client.call("leases.add_resource", {"id": "api-1", "resource": {"type": "content", "id": digest}})
    client.call("leases.add_resource", {"id": "api-1", "resource": {"type": "snapshots/overlayfs", "id": "k 1"}})
    client.call("leases.add_resource", {"id": "api-1", "resource": {"type": "ingests", "id": "ref-1"}})
    client.call("leases.add_resource", {"id": "api-1", "resource": {"type": "ingests", "id": "ref-1"}})  # idempotent
    resources = client.call("leases.list_resources", {"id": "api-1"})["resources"]
    assert resources == [
        {"type": "content", "id": digest},
        {"type": "ingests", "id": "ref-1"},
        {"type": "snapshots/overlayfs", "id": "k 1"},
    ]
    with pytest.raises(InvalidArgument):
        client.call("leases.add_resource", {"id": "api-1", "resource": {"type": "content", "id": "nope"}})
    with pytest.raises(InvalidArgument):
        client.call("leases.add_resource", {"id": "api-1", "resource": {"type": "snapshots", "id": "k"}})
    with pytest.raises(Unimplemented):
        client.call("leases.add_resource", {"id": "api-1", "resource": {"type": "images", "id": "x"}})
    with pytest.raises(NotFound):
        client.call("leases.add_resource", {"id": "nope", "resource": {"type": "content", "id": digest}})
    client.call("leases.delete_resource", {"id": "api-1", "resource": {"type": "ingests", "id": "ref-1"}})
    assert len(client.call("leases.list_resources", {"id": "api-1"})["resources"]) == 2
    # another namespace sees none of it
    other = quiet_daemon.client("other-ns")
    assert other.call("leases.list", {})["leases"] == []
    with pytest.raises(NotFound):
        other.call("leases.delete", {"id": "api-1"})
    for lease_id in ("api-1", generated):
        client.call("leases.delete", {"id": lease_id})
    with pytest.raises(NotFound):
        client.call("leases.delete", {"id": "api-1"})
    with pytest.raises(NotFound):
        client.call("leases.list_resources", {"id": "api-1"})


def test_lease_protects_content_until_deleted(quiet_daemon: Daemon) -> None:
    """A blob committed under a lease survives gc; deleting the lease (sync) removes it."""
    client = quiet_daemon.client()
    client.call("leases.create", {"id": "hold-content"})
    try:
        held = write_blob(quiet_daemon, b"held by a lease\n", lease="hold-content")
        loose = write_blob(quiet_daemon, b"held by nothing\n")
        assert client.call("leases.list_resources", {"id": "hold-content"})["resources"] == [{"type": "content", "id": held}]
        client.call("gc.run", {}, timeout=60)
        # The loose blob is gone, whether this run or a scheduled one just before took it.
        with pytest.raises(NotFound):
            client.call("content.info", {"digest": loose})
        assert not os.path.exists(blob_path(quiet_daemon, loose))
        assert os.path.exists(blob_path(quiet_daemon, held))
        client.call("content.info", {"digest": held})
    finally:
        client.call("leases.delete", {"id": "hold-content", "sync": True}, timeout=60)
    assert not os.path.exists(blob_path(quiet_daemon, held))
    with pytest.raises(NotFound):
        client.call("content.info", {"digest": held})


def test_lease_holds_snapshots_it_prepares_and_commits(quiet_daemon: Daemon) -> None:
    """Prepare and Commit under a lease: the lease holds the key, then the committed name."""
    client = quiet_daemon.client()
    client.call("leases.create", {"id": "hold-snap"})
    before = snapshot_dirs(quiet_daemon)
    client.call("snapshots.prepare", {"snapshotter": "overlayfs", "key": "active-1"}, lease="hold-snap")
    resources = client.call("leases.list_resources", {"id": "hold-snap"})["resources"]
    assert resources == [{"type": "snapshots/overlayfs", "id": "active-1"}]
    client.call("gc.run", {}, timeout=60)
    client.call("snapshots.commit", {"snapshotter": "overlayfs", "name": "layer-1", "key": "active-1"}, lease="hold-snap")
    resources = client.call("leases.list_resources", {"id": "hold-snap"})["resources"]
    assert resources == [{"type": "snapshots/overlayfs", "id": "layer-1"}]
    client.call("snapshots.view", {"snapshotter": "overlayfs", "key": "view-1", "parent": "layer-1"}, lease="hold-snap")
    report = client.call("gc.run", {}, timeout=60)
    assert report["snapshots"] == []
    assert len(snapshot_dirs(quiet_daemon) - before) == 2
    client.call("leases.delete", {"id": "hold-snap"})
    report = client.call("gc.run", {}, timeout=60)
    removed = [(s["key"]) for s in report["snapshots"]]
    assert removed == ["view-1", "layer-1"]  # the child before its parent
    assert snapshot_dirs(quiet_daemon) == before
    with pytest.raises(NotFound):
        client.call("snapshots.prepare", {"snapshotter": "overlayfs", "key": "x"}, lease="no-such-lease")
    with pytest.raises(NotFound):
        client.call("snapshots.stat", {"snapshotter": "overlayfs", "key": "x"})


def test_expired_lease_is_reaped_on_an_idle_daemon(quiet_daemon: Daemon) -> None:
    """A lease past its gc.expire goes, with what only it held, without any request."""
    client = quiet_daemon.client()
    client.call("leases.create", {"id": "short", "labels": {EXPIRE: rfc3339(time.time() + 2)}})
    digest = write_blob(quiet_daemon, b"only until the lease expires\n", lease="short")
    path = blob_path(quiet_daemon, digest)
    assert os.path.exists(path)
    wait_until(lambda: not os.path.exists(path), 15, "the expired lease's blob to be collected", interval=0.2)
    assert [x["id"] for x in client.call("leases.list", {})["leases"]] == []


def test_moorctl_leases(quiet_daemon: Daemon) -> None:
    """leases create/ls/rm print as ctr's."""
    made = quiet_daemon.moorctl("leases", "create", "--id", "cli-1", "--expires", "1h30m", "owner=me")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "cli-1"
    listing = quiet_daemon.moorctl("leases", "ls")
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["ID", "CREATED", "AT", "LABELS"]
    assert row.startswith("cli-1 ") and "owner=me" in row and EXPIRE in row
    assert quiet_daemon.moorctl("leases", "ls", "-q").stdout.split() == ["cli-1"]
    removed = quiet_daemon.moorctl("leases", "rm", "--sync", "cli-1")
    assert removed.returncode == 0 and removed.stdout.strip() == "cli-1"
    gone = quiet_daemon.moorctl("leases", "rm", "cli-1")
    assert gone.returncode == 1 and "not_found" in gone.stderr


def test_a_writer_finding_the_blob_leases_it(quiet_daemon: Daemon) -> None:
    """As containerd's: a write under a lease that finds its blob already stored answers
    AlreadyExists, and the lease now holds the blob (the caller is about to use it)."""
    client = quiet_daemon.client()
    digest = write_blob(quiet_daemon, b"already here\n")
    lease = client.call("leases.create", {"id": "finder"})["lease"]["id"]
    with pytest.raises(AlreadyExists):
        client.call("content.write", {"action": "stat", "ref": "finder-1", "total": 13, "expected": digest}, lease=lease)
    held = client.call("leases.list_resources", {"id": lease})["resources"]
    assert {"type": "content", "id": digest} in held
    # a read under a lease holds nothing
    reader = client.call("leases.create", {"id": "reader"})["lease"]["id"]
    client.call_frames("content.read", {"digest": digest}, lease=reader)
    assert client.call("leases.list_resources", {"id": reader})["resources"] == []
