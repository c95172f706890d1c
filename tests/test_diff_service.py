"""The Diff service: layers made from real overlay snapshots and applied back onto them.

The DiffActor is hosted in this process behind a real Bridge on its own ipc endpoint;
it reaches the real daemon's content and snapshot processes with a real Client.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from typing import Any, Iterator

import pytest

from moord.actors.diff import MODE_NATIVE, apply_layer
from moord.actors.diff_service import DiffActor
from moord.actors.layer_writer import write_layer
from moord.bus.bridge import Bridge
from moord.bus.client import Client
from moord.config.model import load_config
from moord.linux.mount import mounted
from moord.messages.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from tests.daemon import Daemon

BUSYBOX = "docker.io/library/busybox:latest"
TAR = "application/vnd.oci.image.layer.v1.tar"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class DiffService:
    """The in-process Diff service and a client of the daemon behind it."""

    def __init__(self, daemon: Daemon, client: Client, address: str, lease: str) -> None:
        self.daemon = daemon
        self.client = client
        self.address = address
        # Everything here is held by a lease, as ctr holds one: the daemon's collector
        # would otherwise take unreferenced active snapshots and blobs mid-test.
        self.lease = lease
        self.snapshots: list[str] = []
        # Mount points inside the daemon's own directory, which its cleanup unmounts.
        self.mount_dir = os.path.join(daemon.base, "test-mounts")
        os.makedirs(self.mount_dir, exist_ok=True)

    def call(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A diff.* request through the bridge."""
        return self.client.call(kind, payload, address=self.address, timeout=120, lease=self.lease)

    def snapshot(self, kind: str, key: str, parent: str = "") -> list[dict[str, Any]]:
        """Prepare (or view) a snapshot this test removes at the end; its mounts."""
        mounts = self.client.call(f"snapshots.{kind}", {"key": key, "parent": parent}, lease=self.lease)["mounts"]
        self.snapshots.append(key)
        return list(mounts)

    def mounted(self, mounts: list[dict[str, Any]]) -> Any:
        """The mounts on a temporary directory of this daemon's (unmounted on exit)."""
        return mounted(mounts, self.mount_dir)


@pytest.fixture(scope="module")
def service(imported: Daemon) -> Iterator[DiffService]:
    """DiffActor on a temporary endpoint, talking to the module's daemon."""
    config = load_config(imported.config_path)
    client = Client(imported.ipc_dir, timeout=60)
    ref = DiffActor.start(config, client)
    base = tempfile.mkdtemp(prefix="md-", dir="/tmp")
    bridge = Bridge("diff-test", os.path.join(base, "diff.sock"))
    try:
        bridge.serve(ref, DiffActor.kinds())
        bridge.start()
        lease = client.call("leases.create", {})["lease"]["id"]
        svc = DiffService(imported, client, bridge.path, lease)
        try:
            yield svc
        finally:
            for key in reversed(svc.snapshots):
                with contextlib.suppress(Exception):
                    client.call("snapshots.remove", {"key": key}, timeout=60)
            with contextlib.suppress(Exception):
                client.call("leases.delete", {"id": lease})
    finally:
        bridge.stop()
        ref.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def busybox_chain(service: DiffService) -> str:
    """The chain ID of busybox's top layer (a committed snapshot)."""
    return str(service.client.call("transfer.unpack", {"name": BUSYBOX}, timeout=120)["chain_id"])


def tree(root: str) -> dict[str, tuple[Any, ...]]:
    """Every path below `root` with what a layer must carry (mtimes to the second; the root's own left out)."""
    found: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            xattrs = {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False) if k.startswith("user.")}
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    content = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns // 10**9, st.st_nlink, content, xattrs)
    return found


def modify(root: str) -> None:
    """Add, change and delete things in a busybox tree."""
    os.mkdir(os.path.join(root, "data"), 0o750)
    os.mkdir(os.path.join(root, "data", "sub"))
    new = os.path.join(root, "data", "sub", "new.txt")
    with open(new, "w") as fh:
        fh.write("hello layer\n")
    os.chown(new, 1000, 1001)
    os.chmod(new, 0o4640)
    os.setxattr(new, "user.moord.test", b"\x00\xffbinary")
    os.link(new, os.path.join(root, "data", "hard"))
    os.symlink("../etc/passwd", os.path.join(root, "data", "passwd-link"))
    os.mkfifo(os.path.join(root, "data", "pipe"), 0o600)
    os.mknod(os.path.join(root, "data", "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    big = os.path.join(root, "data", "big.bin")
    with open(big, "wb") as fh:
        fh.write(os.urandom(5 * 1024 * 1024 + 17))  # more than one 4 MiB content chunk
    with open(os.path.join(root, "etc", "passwd"), "a") as fh:
        fh.write("moord:x:1000:1001::/home/moord:/bin/sh\n")
    os.chmod(os.path.join(root, "tmp"), 0o1770)
    os.unlink(os.path.join(root, "etc", "group"))
    os.unlink(os.path.join(root, "bin", "ls"))
    shutil.rmtree(os.path.join(root, "usr", "sbin"))
    # A directory replaced by a file, and a symlink replaced by a directory.
    shutil.rmtree(os.path.join(root, "root"))
    with open(os.path.join(root, "root"), "w") as fh:
        fh.write("now a file\n")
    os.unlink(os.path.join(root, "bin", "cat"))
    os.mkdir(os.path.join(root, "bin", "cat"))


# -- the layer writer alone ----------------------------------------------------------


def test_write_layer_round_trips_between_plain_trees() -> None:
    """Changes between two directories, applied in native mode, reproduce the newer one."""
    base = tempfile.mkdtemp(prefix="md-", dir="/tmp")
    try:
        left, right, target = (os.path.join(base, n) for n in ("left", "right", "target"))
        for d in (left, right):
            os.mkdir(d)
            for sub in ("bin", "etc", "root", "tmp", "usr", "usr/sbin"):
                os.makedirs(os.path.join(d, sub))
            for name in ("etc/passwd", "etc/group", "bin/busybox", "usr/sbin/x"):
                with open(os.path.join(d, name), "w") as fh:
                    fh.write(name)
                os.utime(os.path.join(d, name), (1_600_000_000, 1_600_000_000))
            for applet in ("ls", "cat"):
                os.symlink("busybox", os.path.join(d, "bin", applet))
        modify(right)
        shutil.copytree(left, target, symlinks=True)
        layer = os.path.join(base, "layer.tar")
        with open(layer, "wb") as fh:
            stats = write_layer(left, right, fh.write)
        result = apply_layer(layer, target, mode=MODE_NATIVE)
        assert result.diff_id == stats.diff_id and result.size == stats.size
        assert tree(target) == tree(right)
        # Nothing changed: an empty layer (just the end-of-archive blocks).
        with open(layer, "wb") as fh:
            assert write_layer(right, right, fh.write).size == 1024
    finally:
        shutil.rmtree(base)


# -- the service against a real daemon ------------------------------------------------


@pytest.mark.parametrize("media_type", [GZIP, TAR])
def test_diff_of_an_overlay_snapshot_applies_back(service: DiffService, busybox_chain: str, media_type: str) -> None:
    """diff(parent view, modified active) -> a layer; applied on a fresh snapshot of the
    same parent it gives the modified tree, and apply reports the diff's diff ID."""
    tag = "gz" if media_type == GZIP else "tar"
    active = service.snapshot("prepare", f"diff-active-{tag}", busybox_chain)
    with service.mounted(active) as root:
        modify(root)
    view = service.snapshot("view", f"diff-view-{tag}", busybox_chain)

    desc = service.call("diff.diff", {"left": view, "right": active, "media_type": media_type, "labels": {"test": tag}})["diff"]
    assert desc["media_type"] == media_type
    info = service.client.call("content.info", {"digest": desc["digest"]})["info"]
    assert info["size"] == desc["size"]
    assert info["labels"]["test"] == tag
    diff_id = info["labels"]["containerd.io/uncompressed"]
    if media_type == TAR:
        assert diff_id == desc["digest"]

    fresh = service.snapshot("prepare", f"diff-fresh-{tag}", busybox_chain)
    applied = service.call("diff.apply", {"diff": desc, "mounts": fresh})["applied"]
    assert applied["digest"] == diff_id
    assert applied["media_type"] == TAR

    with service.mounted(active) as want_root, service.mounted(fresh) as got_root:
        want, got = tree(want_root), tree(got_root)
        assert got == want
        assert "etc/group" not in got and "usr/sbin" not in got and "bin/ls" not in got
        assert stat.S_ISREG(got["root"][0]) and stat.S_ISDIR(got["bin/cat"][0])
        assert got["data/sub/new.txt"][6] == {"user.moord.test": b"\x00\xffbinary"}
        assert os.stat(os.path.join(got_root, "data", "hard")).st_ino == os.stat(os.path.join(got_root, "data", "sub", "new.txt")).st_ino


def test_diff_without_left_is_the_whole_tree(service: DiffService, busybox_chain: str) -> None:
    """No left mounts: the layer holds all of the right tree, and applies onto nothing."""
    view = service.snapshot("view", "diff-whole-view", busybox_chain)
    desc = service.call("diff.diff", {"right": view})["diff"]
    assert desc["media_type"] == GZIP
    empty = service.snapshot("prepare", "diff-whole-empty")
    applied = service.call("diff.apply", {"diff": desc, "mounts": empty})["applied"]
    info = service.client.call("content.info", {"digest": desc["digest"]})["info"]
    assert applied["digest"] == info["labels"]["containerd.io/uncompressed"]
    with service.mounted(view) as want_root, service.mounted(empty) as got_root:
        assert tree(got_root) == tree(want_root)
    # The same tree diffed again is the same blob (it exists already: still the answer).
    again = service.call("diff.diff", {"right": view, "ref": "diff-again"})["diff"]
    assert again == desc
    # The service's own read-only mounts are gone.
    assert os.listdir(os.path.join(service.daemon.root, "tmpmounts")) == []


def test_errors_are_typed(service: DiffService, busybox_chain: str) -> None:
    """Unknown media types, missing blobs, wrong descriptors and bad mounts fail clearly."""
    view = service.snapshot("view", "diff-errors-view", busybox_chain)
    with pytest.raises(Unimplemented):
        service.call("diff.diff", {"right": view, "media_type": "application/vnd.oci.image.layer.v1.tar+bzip2"})
    with pytest.raises(InvalidArgument):
        service.call("diff.diff", {"right": []})
    with pytest.raises(InvalidArgument):
        service.call("diff.diff", {"right": [{"type": "bind", "source": "/nonexistent/moord", "options": ["rbind"]}]})

    desc = service.call("diff.diff", {"right": view, "media_type": TAR})["diff"]
    target = service.snapshot("prepare", "diff-errors-target", busybox_chain)
    with pytest.raises(Unimplemented):
        service.call("diff.apply", {"diff": {**desc, "media_type": "application/x-unknown"}, "mounts": target})
    with pytest.raises(NotFound):
        service.call("diff.apply", {"diff": {**desc, "digest": "sha256:" + "0" * 64}, "mounts": target})
    with pytest.raises(FailedPrecondition):
        service.call("diff.apply", {"diff": {**desc, "size": desc["size"] + 1}, "mounts": target})
    with pytest.raises(InvalidArgument):
        service.call("diff.apply", {"diff": {**desc, "media_type": GZIP}, "mounts": target})
    with pytest.raises(InvalidArgument):
        service.call("diff.apply", {"diff": desc, "mounts": []})


def test_a_restarted_images_process_undoes_leftover_diff_mounts(fresh_daemon: Daemon) -> None:
    """A diff interrupted by a crash leaves a mount under <root>/tmpmounts: the next start of
    the images process unmounts and removes it."""
    from moord.linux.mount import is_mountpoint, mount
    from tests.daemon import wait_until

    parent = os.path.join(fresh_daemon.root, "tmpmounts")
    os.makedirs(parent, exist_ok=True)
    leftover = tempfile.mkdtemp(prefix="diff-", dir=parent)
    source = tempfile.mkdtemp(prefix="md-src-", dir="/tmp")
    try:
        mount({"type": "bind", "source": source, "options": ["ro", "rbind"]}, leftover)
        assert is_mountpoint(leftover)
        old = fresh_daemon.child_pid("images")
        os.kill(old, 9)
        wait_until(lambda: fresh_daemon.child_pid("images") not in (0, old), 30, "the images process to restart")
        wait_until(lambda: not os.path.exists(leftover), 30, "the leftover mount to be cleaned up")
    finally:
        if os.path.exists(leftover) and is_mountpoint(leftover):
            from moord.linux.mount import unmount_all

            unmount_all(leftover, detach=True)
        shutil.rmtree(source, ignore_errors=True)
