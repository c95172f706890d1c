"""Namespace isolation end to end: nothing of namespace A is listed, readable or deletable
from namespace B (images, containers, content, snapshots), through moorctl and the
client alike; B uses the same names independently; blobs are shared on disk only.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import pytest

from moord.bus.client import Client
from moord.messages.errors import NotFound
from tests.daemon import Daemon

A = "default"  # where the `imported` fixture put busybox
IMAGE = "docker.io/library/busybox:latest"


def moorctl(daemon: Daemon, ns: str, *args: str, status: int = 0) -> str:
    """moorctl in namespace `ns`, insisting on an exit status; returns stdout."""
    result = daemon.moorctl("--namespace", ns, *args)
    assert result.returncode == status, f"moorctl -n {ns} {' '.join(args)}: rc {result.returncode}: {result.stderr}"
    return result.stdout if status == 0 else result.stderr


def rows(stdout: str) -> list[str]:
    """First column of a ctr-style table, header dropped."""
    return [line.split()[0] for line in stdout.splitlines()[1:] if line.strip()]


def blob_files(daemon: Daemon) -> set[str]:
    """Blobs on disk, whichever namespaces own them."""
    return set(os.listdir(os.path.join(daemon.root, "io.containerd.content.v1.content", "blobs", "sha256")))


def read_all(client: Client, digest: str) -> bytes:
    """A whole blob through content.read."""
    data = b""
    while True:
        reply, frames = client.call_frames("content.read", {"digest": digest, "offset": len(data)})
        data += b"".join(bytes(f) for f in frames)
        if len(data) >= reply["size"] or not frames:
            return data


def container(cid: str, labels: dict[str, str]) -> dict[str, Any]:
    """A minimal container record."""
    return {
        "id": cid,
        "labels": labels,
        "image": IMAGE,
        "runtime": {"name": "io.containerd.runc.v2"},
        "spec": b'{"ociVersion": "1.0.2"}',
        "snapshotter": "overlayfs",
        "snapshot_key": "",
    }


@pytest.fixture
def b_ns() -> str:
    """A fresh namespace B."""
    return "b" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def a_state(imported: Daemon) -> dict[str, Any]:
    """What namespace A holds after the import, plus a container and an ingest of its own."""
    client = imported.client(A)
    client.call("containers.create", {"container": container("shared-name", {"owner": "a"})})
    client.call(
        "content.write", {"action": "write", "ref": "ingest-shared-name", "total": 100, "writer": "a-writer"},
        frames=[b"a" * 10],
    )
    blobs = moorctl(imported, A, "content", "ls", "-q").split()
    snapshots = {i["name"]: i for i in client.call("snapshots.list", {})["info"]}
    assert blobs and snapshots
    return {"blobs": blobs, "snapshots": snapshots}


def assert_a_intact(daemon: Daemon, state: dict[str, Any]) -> None:
    """A still sees, reads and owns all it had."""
    client = daemon.client(A)
    assert IMAGE in moorctl(daemon, A, "images", "ls", "-q").split()
    assert sorted(moorctl(daemon, A, "content", "ls", "-q").split()) == sorted(state["blobs"])
    for digest in state["blobs"]:
        assert "sha256:" + hashlib.sha256(read_all(client, digest)).hexdigest() == digest
    assert {i["name"] for i in client.call("snapshots.list", {})["info"]} == set(state["snapshots"])
    owner = client.call("containers.get", {"id": "shared-name"})["container"]["labels"]
    assert owner == {"owner": "a"}
    assert client.call("content.status", {"ref": "ingest-shared-name"})["status"]["offset"] == 10


def test_b_lists_nothing_of_a(imported: Daemon, a_state: dict[str, Any], b_ns: str) -> None:
    assert moorctl(imported, b_ns, "images", "ls", "-q") == ""
    assert rows(moorctl(imported, b_ns, "content", "ls")) == []
    assert rows(moorctl(imported, b_ns, "content", "active")) == []
    assert rows(moorctl(imported, b_ns, "snapshots", "ls")) == []
    assert rows(moorctl(imported, b_ns, "snapshots", "--snapshotter", "native", "ls")) == []
    assert rows(moorctl(imported, b_ns, "containers", "ls")) == []
    client = imported.client(b_ns)
    assert client.call("images.list", {})["images"] == []
    assert client.call("content.list", {"filters": [f"digest=={a_state['blobs'][0]}"]})["infos"] == []
    assert client.call("content.list_statuses", {})["statuses"] == []
    assert client.call("containers.list", {"filters": ["id==shared-name"]})["containers"] == []
    assert client.call("snapshots.list", {"filters": ["kind==committed"]})["info"] == []


def test_b_reads_nothing_of_a(imported: Daemon, a_state: dict[str, Any], b_ns: str) -> None:
    client = imported.client(b_ns)
    digest = a_state["blobs"][0]
    assert "not_found" in moorctl(imported, b_ns, "content", "get", digest, status=1)
    assert "not_found" in moorctl(imported, b_ns, "content", "label", digest, status=1)
    assert "not_found" in moorctl(imported, b_ns, "snapshots", "info", next(iter(a_state["snapshots"])), status=1)
    with pytest.raises(NotFound):
        client.call("images.get", {"name": IMAGE})
    with pytest.raises(NotFound):
        client.call("content.info", {"digest": digest})
    with pytest.raises(NotFound):
        client.call("content.read", {"digest": digest, "offset": 0, "size": 10})
    with pytest.raises(NotFound):
        client.call("content.status", {"ref": "ingest-shared-name"})
    with pytest.raises(NotFound):
        client.call("containers.get", {"id": "shared-name"})
    for key in a_state["snapshots"]:
        with pytest.raises(NotFound):
            client.call("snapshots.stat", {"key": key})
        with pytest.raises(NotFound):
            client.call("snapshots.usage", {"key": key})
        # nor can B build on A's layers
        with pytest.raises(NotFound):
            client.call("snapshots.prepare", {"key": f"on-{uuid.uuid4().hex[:8]}", "parent": key})
        with pytest.raises(NotFound):
            client.call("snapshots.view", {"key": f"view-{uuid.uuid4().hex[:8]}", "parent": key})
    assert client.call("snapshots.list", {})["info"] == []  # the failed prepares left nothing


def test_b_deletes_and_changes_nothing_of_a(imported: Daemon, a_state: dict[str, Any], b_ns: str) -> None:
    client = imported.client(b_ns)
    assert "not_found" in moorctl(imported, b_ns, "images", "rm", IMAGE, status=1)
    removed = moorctl(imported, b_ns, "content", "rm", *a_state["blobs"])
    assert removed == ""  # nothing of A's was deleted, so nothing is printed
    assert "not_found" in moorctl(imported, b_ns, "containers", "rm", "shared-name", status=1)
    for key in a_state["snapshots"]:
        assert "not_found" in moorctl(imported, b_ns, "snapshots", "rm", key, status=1)
        assert "not_found" in moorctl(imported, b_ns, "snapshots", "label", key, "x=y", status=1)
    with pytest.raises(NotFound):
        client.call("content.abort", {"ref": "ingest-shared-name"})
    with pytest.raises(NotFound):
        client.call(
            "content.update",
            {"info": {"digest": a_state["blobs"][0], "size": 0, "labels": {"x": "y"}}, "update_mask": ["labels.x"]},
        )
    with pytest.raises(NotFound):
        client.call("containers.update", {"container": container("shared-name", {"owner": "b"})})
    with pytest.raises(NotFound):
        client.call("images.delete", {"name": IMAGE})
    assert_a_intact(imported, a_state)


def test_b_uses_the_same_names_independently(imported: Daemon, a_state: dict[str, Any], b_ns: str, busybox_layout: str) -> None:
    client = imported.client(b_ns)
    on_disk = blob_files(imported)

    # The same image name, imported again: B owns the blobs now, and no bytes were copied.
    moorctl(imported, b_ns, "images", "import", busybox_layout)
    assert IMAGE in moorctl(imported, b_ns, "images", "ls", "-q").split()
    assert sorted(moorctl(imported, b_ns, "content", "ls", "-q").split()) == sorted(a_state["blobs"])
    assert blob_files(imported) == on_disk
    # B's unpack made B's own snapshots, under the same chain-id names as A's.
    b_snapshots = {i["name"] for i in client.call("snapshots.list", {})["info"]}
    assert b_snapshots == set(a_state["snapshots"])

    # The same container id, the same snapshot key, the same ingest ref: B's own.
    client.call("containers.create", {"container": container("shared-name", {"owner": "b"})})
    top = next(name for name, info in a_state["snapshots"].items() if info["kind"] == "committed")
    client.call("snapshots.prepare", {"key": "shared-name", "parent": top, "labels": {"containerd.io/gc.root": "b"}})
    client.call(
        "content.write", {"action": "write", "ref": "ingest-shared-name", "total": 100, "writer": "b-writer"},
        frames=[b"b" * 30],
    )
    assert client.call("content.status", {"ref": "ingest-shared-name"})["status"]["offset"] == 30
    assert client.call("containers.get", {"id": "shared-name"})["container"]["labels"] == {"owner": "b"}
    # Labels on a shared blob are per namespace.
    digest = a_state["blobs"][0]
    assert "team=b" in moorctl(imported, b_ns, "content", "label", digest, "team=b").strip().split(",")
    assert "team" not in imported.client(A).call("content.info", {"digest": digest})["info"]["labels"]
    assert_a_intact(imported, a_state)

    # Tearing B down leaves A whole, and the blobs A still owns stay on disk.
    client.call("content.abort", {"ref": "ingest-shared-name"})
    client.call("snapshots.remove", {"key": "shared-name"})
    moorctl(imported, b_ns, "containers", "rm", "shared-name")
    # B's copies go while its image still refers to them (once the image is gone, the
    # garbage collector may take them first).
    assert sorted(moorctl(imported, b_ns, "content", "rm", *a_state["blobs"]).split()) == sorted(a_state["blobs"])
    moorctl(imported, b_ns, "images", "rm", IMAGE)
    for _ in range(len(b_snapshots)):  # children first: remove what has no child each round
        infos = client.call("snapshots.list", {})["info"]
        parents = {i["parent"] for i in infos}
        for info in infos:
            if info["name"] not in parents:
                try:
                    client.call("snapshots.remove", {"key": info["name"]})
                except NotFound:
                    pass  # collected meanwhile
    assert client.call("snapshots.list", {})["info"] == []
    assert moorctl(imported, b_ns, "content", "ls", "-q") == ""
    assert blob_files(imported) == on_disk
    moorctl(imported, A, "namespaces", "rm", b_ns)
    assert b_ns not in moorctl(imported, A, "namespaces", "ls", "-q").split()
    assert_a_intact(imported, a_state)


def test_same_container_id_runs_in_both_namespaces(imported: Daemon, a_state: dict[str, Any], b_ns: str, busybox_layout: str) -> None:
    moorctl(imported, b_ns, "images", "import", busybox_layout)
    # "shared-name" is a container of A: B runs its own under that id, then removes it.
    out = moorctl(imported, b_ns, "run", "--rm", IMAGE, "shared-name", "echo", "hello from b")
    assert out.strip() == "hello from b"
    assert rows(moorctl(imported, b_ns, "containers", "ls")) == []
    assert_a_intact(imported, a_state)


def test_a_namespace_holding_snapshots_cannot_be_deleted(daemon) -> None:
    client = daemon.client(namespace="snapkeeper")
    client.call("namespaces.create", {"namespace": {"name": "snapkeeper"}})
    client.call("snapshots.prepare", {"key": "kept", "labels": {"containerd.io/gc.root": "yes"}})
    result = daemon.moorctl("-n", "snapkeeper", "namespaces", "rm", "snapkeeper")
    assert result.returncode != 0 and "snapshots" in result.stderr
    client.call("snapshots.remove", {"key": "kept"})
    assert daemon.moorctl("namespaces", "rm", "snapkeeper").returncode == 0
