"""Garbage collection against a real daemon: what an image, a container or a lease keeps,
what `images rm` + `gc run` removes from disk, and `gc why`."""

from __future__ import annotations

import os
from typing import Any

import pytest

from moord.messages.errors import NotFound
from tests.daemon import Daemon

CONTENT_BLOBS = os.path.join("io.containerd.content.v1.content", "blobs", "sha256")
OVERLAY_SNAPSHOTS = os.path.join("io.containerd.snapshotter.v1.overlayfs", "snapshots")
IMAGE = "docker.io/library/busybox:latest"

def blob_path(daemon: Daemon, digest: str) -> str:
    """Where the content store keeps a blob."""
    return os.path.join(daemon.root, CONTENT_BLOBS, digest.split(":", 1)[1])


def snapshot_dirs(daemon: Daemon) -> set[str]:
    """Directory names under the overlayfs snapshotter's snapshots/."""
    path = os.path.join(daemon.root, OVERLAY_SNAPSHOTS)
    return {name for name in os.listdir(path) if not name.startswith("new-")}


def gc_run(daemon: Daemon) -> dict[str, Any]:
    """Collect now through the API."""
    return daemon.client(timeout=120).call("gc.run", {})


def top_chain(daemon: Daemon) -> str:
    """The committed snapshot the busybox config points at."""
    infos = daemon.client().call("content.list", {})["infos"]
    for info in infos:
        for key, value in info["labels"].items():
            if key == "containerd.io/gc.ref.snapshot.overlayfs":
                return value
    raise AssertionError("no config labelled with its snapshot")


def test_image_keeps_its_blobs_and_snapshots(imported: Daemon) -> None:
    """gc run removes nothing an image references: every blob and snapshot stays, on disk too."""
    client = imported.client()
    blobs = [i["digest"] for i in client.call("content.list", {})["infos"]]
    snaps = client.call("snapshots.list", {"snapshotter": "overlayfs"})["info"]
    assert blobs and snaps
    dirs = snapshot_dirs(imported)
    report = gc_run(imported)
    assert report["content"] == [] and report["snapshots"] == [] and report["blobs_removed"] == []
    assert report["pause_seconds"] >= 0 and report["marked"] >= len(blobs) + len(snaps)
    assert sorted(i["digest"] for i in client.call("content.list", {})["infos"]) == sorted(blobs)
    assert len(client.call("snapshots.list", {"snapshotter": "overlayfs"})["info"]) == len(snaps)
    assert all(os.path.exists(blob_path(imported, d)) for d in blobs)
    assert snapshot_dirs(imported) == dirs


def test_gc_why_prints_the_chain(imported: Daemon) -> None:
    """`gc why` on a layer and on a snapshot names the image and each reference down to it."""
    infos = imported.client().call("content.list", {})["infos"]
    layer = next(i["digest"] for i in infos if "containerd.io/uncompressed" in i["labels"])
    result = imported.moorctl("gc", "why", layer)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"image {IMAGE} (root: image)"
    assert "(target)" in lines[1]
    assert lines[-1].strip().startswith(f"-> content {layer} (label containerd.io/gc.ref.content.l.")
    chain = top_chain(imported)
    result = imported.moorctl("gc", "why", f"overlayfs/{chain}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"image {IMAGE} (root: image)"
    assert f"-> snapshot overlayfs/{chain} (label containerd.io/gc.ref.snapshot.overlayfs)" in result.stdout
    missing = imported.moorctl("gc", "why", "sha256:" + "0" * 64)
    assert missing.returncode == 1 and "not_found" in missing.stderr


def test_container_keeps_its_snapshot(imported: Daemon) -> None:
    """A container's snapshot survives gc; once the container is deleted, gc removes it."""
    client = imported.client()
    parent = top_chain(imported)
    before = snapshot_dirs(imported)
    client.call("snapshots.prepare", {"snapshotter": "overlayfs", "key": "gc-c1", "parent": parent})
    new_dir = (snapshot_dirs(imported) - before).pop()
    spec = b'{"ociVersion": "1.0.2"}'
    container = {
        "id": "gc-c1",
        "image": IMAGE,
        "runtime": {"name": "io.containerd.runc.v2", "options": {}},
        "spec": spec,
        "snapshotter": "overlayfs",
        "snapshot_key": "gc-c1",
    }
    try:
        client.call("containers.create", {"container": container})
        gc_run(imported)
        client.call("snapshots.stat", {"snapshotter": "overlayfs", "key": "gc-c1"})
        assert imported.moorctl("gc", "why", "overlayfs/gc-c1").stdout.startswith("container gc-c1 (root: container)")
    finally:
        client.call("containers.delete", {"id": "gc-c1"})
    gc_run(imported)  # the scheduler may have been first (containers.delete is a deletion)
    with pytest.raises(NotFound):
        client.call("snapshots.stat", {"snapshotter": "overlayfs", "key": "gc-c1"})
    assert new_dir not in snapshot_dirs(imported)
    client.call("snapshots.stat", {"snapshotter": "overlayfs", "key": parent})  # the image's stays


def test_unlabelled_view_is_collected_and_its_parent_stays_removable(imported: Daemon) -> None:
    """containerd 1.6 can strand a parent under a collected View's record; here the view goes
    whole and the parent keeps no child record."""
    client = imported.client()
    parent = top_chain(imported)
    client.call("snapshots.view", {"snapshotter": "overlayfs", "key": "gc-view", "parent": parent})
    gc_run(imported)
    with pytest.raises(NotFound):
        client.call("snapshots.stat", {"snapshotter": "overlayfs", "key": "gc-view"})
    children = [s for s in client.call("snapshots.list", {"snapshotter": "overlayfs"})["info"] if s["parent"] == parent]
    assert children == []


def test_images_rm_then_gc_removes_blobs_and_snapshot_dirs(imported: Daemon) -> None:
    """After images rm, gc removes the image's content records, blob files and snapshot dirs."""
    client = imported.client()
    blobs = [i["digest"] for i in client.call("content.list", {})["infos"]]
    snaps = [s["name"] for s in client.call("snapshots.list", {"snapshotter": "overlayfs"})["info"]]
    assert imported.moorctl("images", "rm", IMAGE).returncode == 0
    result = imported.moorctl("gc", "run", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "writes paused" in result.stdout
    # The scheduler may have collected after the deletion already: the state is what counts.
    for digest in blobs:
        assert not os.path.exists(blob_path(imported, digest))
    assert client.call("content.list", {})["infos"] == []
    assert client.call("snapshots.list", {"snapshotter": "overlayfs"})["info"] == []
    assert snapshot_dirs(imported) == set()
    assert len(snaps) >= 1
