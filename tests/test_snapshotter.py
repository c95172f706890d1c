"""The snapshotter behind a real Bridge, called through a real Client, with real mounts."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import zmq

from moord.actors.snapshotter import start
from moord.bus.bridge import Bridge
from moord.bus.client import Client, endpoint_path
from moord.bus.events import EventPublisher, events_in_path
from moord.config.model import Config
from moord.linux import mount as linux_mount
from moord.linux.mount import is_mountpoint, mount_points, mounted, unmount_all
from moord.messages import envelope as codec
from moord.messages.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from moord.messages.types import Mount
from moord.supervisor.process import ProcessContext

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

OVERLAY_ROOT = "io.containerd.snapshotter.v1.overlayfs"
NATIVE_ROOT = "io.containerd.snapshotter.v1.native"


@dataclass
class Env:
    """A snapshotter process hosted in-process, and the means to talk to it."""

    base: str
    root: str
    client: Client
    events: zmq.Socket

    def call(self, kind: str, payload: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        return self.client.call(f"snapshots.{kind}", payload or {}, **kwargs)

    def mount_dir(self) -> str:
        # Mount points live under base so that teardown can always find them.
        path = os.path.join(self.base, "mnt")
        os.makedirs(path, exist_ok=True)
        return path

    def snapshot_dirs(self, plugin: str = OVERLAY_ROOT) -> set[str]:
        return set(os.listdir(os.path.join(self.root, plugin, "snapshots")))

    def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        if not self.events.poll(int(timeout * 1000)):
            raise AssertionError("no event within timeout")
        _topic, body = self.events.recv_multipart()
        return codec.unpack(body)


def _unmount_everything_under(base: str) -> None:
    for point in reversed(mount_points()):
        if point == base or point.startswith(base + "/"):
            unmount_all(point, detach=True)


@pytest.fixture
def env() -> Iterator[Env]:
    base = tempfile.mkdtemp(prefix="md-", dir="/tmp")
    config = Config(root=os.path.join(base, "root"), state=os.path.join(base, "state"))
    ipc = config.ipc_dir
    os.makedirs(ipc, mode=0o700)
    context = zmq.Context.instance()
    # Stand in for the events exchange: bind where publishers connect.
    sink = context.socket(zmq.SUB)
    sink.setsockopt(zmq.LINGER, 0)
    sink.setsockopt(zmq.SUBSCRIBE, b"")
    sink.bind(f"ipc://{events_in_path(ipc)}")
    publisher = EventPublisher(ipc)
    bridge = Bridge("snapshotter", endpoint_path(ipc, "snapshotter"))
    client = Client(ipc, timeout=30)
    proc = ProcessContext("snapshotter", config, bridge, client, publisher)
    try:
        start(proc)
        bridge.start()
        _wait_for_subscription(publisher, sink)
        yield Env(base, config.root, client, sink)
    finally:
        bridge.stop()
        for ref in proc.actors:
            ref.stop()
        client.close()
        publisher.close()
        sink.close(linger=0)
        _unmount_everything_under(base)
        shutil.rmtree(base, ignore_errors=True)


def _wait_for_subscription(publisher: EventPublisher, sink: zmq.Socket) -> None:
    # PUB drops messages until the subscription reached it: ping until one arrives.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publisher.publish("/test/ping", "default", {})
        if sink.poll(50):
            while sink.poll(50):  # drain the pings
                sink.recv_multipart()
            return
    raise AssertionError("event sink never received from the publisher")


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def fill_layer(env: Env, key: str, parent: str, files: dict[str, str], name: str, snapshotter: str = "overlayfs") -> None:
    """Prepare key on parent, write files through a real mount, commit as name."""
    reply = env.call("prepare", {"key": key, "parent": parent, "snapshotter": snapshotter})
    with mounted(reply["mounts"], parent=env.mount_dir()) as root:
        for rel, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            write(os.path.join(root, rel), text)
    env.call("commit", {"name": name, "key": key, "snapshotter": snapshotter})


# -- overlayfs -------------------------------------------------------------------------


def test_prepare_write_commit_then_child_sees_parent(env: Env) -> None:
    reply = env.call("prepare", {"key": "base-work"})
    [m] = reply["mounts"]
    assert m["type"] == "bind" and "rw" in m["options"] and "rbind" in m["options"]
    with mounted(reply["mounts"], parent=env.mount_dir()) as root:
        assert is_mountpoint(root)
        write(os.path.join(root, "hello.txt"), "from base")
        target = root
    assert not os.path.exists(target)
    env.call("commit", {"name": "base", "key": "base-work"})
    info = env.call("stat", {"key": "base"})["info"]
    assert info["kind"] == "committed" and info["parent"] == ""
    with pytest.raises(NotFound):
        env.call("stat", {"key": "base-work"})

    child = env.call("prepare", {"key": "child", "parent": "base"})
    [m] = child["mounts"]
    assert m["type"] == "overlay"
    assert any(o.startswith("upperdir=") for o in m["options"])
    assert any(o.startswith("workdir=") for o in m["options"])
    with mounted(child["mounts"], parent=env.mount_dir()) as root:
        assert read(os.path.join(root, "hello.txt")) == "from base"
        write(os.path.join(root, "own.txt"), "from child")
    # The child's write landed in its own upper dir, not in the parent's.
    with mounted(env.call("mounts", {"key": "child"})["mounts"], parent=env.mount_dir()) as root:
        assert read(os.path.join(root, "own.txt")) == "from child"
        assert read(os.path.join(root, "hello.txt")) == "from base"
    with mounted(env.call("view", {"key": "base-view", "parent": "base"})["mounts"], parent=env.mount_dir()) as root:
        assert sorted(os.listdir(root)) == ["hello.txt"]


def test_three_level_chain_orders_lowerdirs_nearest_first(env: Env) -> None:
    fill_layer(env, "k1", "", {"a": "1", "shared": "from 1"}, "l1")
    fill_layer(env, "k2", "l1", {"b": "2", "shared": "from 2"}, "l2")
    fill_layer(env, "k3", "l2", {"c": "3"}, "l3")
    reply = env.call("prepare", {"key": "top", "parent": "l3"})
    [m] = reply["mounts"]
    lower = next(o for o in m["options"] if o.startswith("lowerdir="))[len("lowerdir="):].split(":")
    ids = [env.call("stat", {"key": k})["info"]["name"] for k in ("l3", "l2", "l1")]
    assert ids == ["l3", "l2", "l1"]
    assert len(lower) == 3
    snap = os.path.join(env.root, OVERLAY_ROOT, "snapshots")
    assert all(p.startswith(snap + "/") and p.endswith("/fs") for p in lower)
    with mounted(reply["mounts"], parent=env.mount_dir()) as root:
        assert read(os.path.join(root, "a")) == "1"
        assert read(os.path.join(root, "b")) == "2"
        assert read(os.path.join(root, "c")) == "3"
        assert read(os.path.join(root, "shared")) == "from 2"  # nearer layer wins
    assert env.call("stat", {"key": "l3"})["info"]["parent"] == "l2"


def test_view_is_read_only_and_cannot_be_committed(env: Env) -> None:
    fill_layer(env, "k1", "", {"f": "1"}, "l1")
    fill_layer(env, "k2", "l1", {"g": "2"}, "l2")
    # One parent: a ro bind of the parent's fs.
    one = env.call("view", {"key": "v1", "parent": "l1"})["mounts"]
    assert one[0]["type"] == "bind" and "ro" in one[0]["options"]
    # Two parents: an overlay without upperdir.
    two = env.call("view", {"key": "v2", "parent": "l2"})["mounts"]
    assert two[0]["type"] == "overlay"
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in two[0]["options"])
    for mounts in (one, two):
        with mounted(mounts, parent=env.mount_dir()) as root:
            assert read(os.path.join(root, "f")) == "1"
            with pytest.raises(OSError) as caught:
                write(os.path.join(root, "new"), "x")
            assert caught.value.errno == errno.EROFS
    assert env.call("stat", {"key": "v1"})["info"]["kind"] == "view"
    with pytest.raises(FailedPrecondition):
        env.call("commit", {"name": "nope", "key": "v1"})
    # A view without parent is an empty ro bind of its own fs.
    empty = env.call("view", {"key": "v0"})["mounts"]
    assert empty[0]["type"] == "bind" and "ro" in empty[0]["options"]


def test_duplicate_key_missing_parent_uncommitted_parent(env: Env) -> None:
    env.call("prepare", {"key": "a"})
    with pytest.raises(AlreadyExists):
        env.call("prepare", {"key": "a"})
    with pytest.raises(AlreadyExists):
        env.call("view", {"key": "a"})
    with pytest.raises(NotFound):
        env.call("prepare", {"key": "b", "parent": "nowhere"})
    with pytest.raises(InvalidArgument):
        env.call("prepare", {"key": "c", "parent": "a"})  # a is active, not committed
    env.call("commit", {"name": "a-done", "key": "a"})
    env.call("prepare", {"key": "d"})
    with pytest.raises(AlreadyExists):
        env.call("commit", {"name": "a-done", "key": "d"})
    with pytest.raises(NotFound):
        env.call("commit", {"name": "x", "key": "missing"})
    with pytest.raises(FailedPrecondition):
        env.call("commit", {"name": "x", "key": "a-done"})
    with pytest.raises(FailedPrecondition):
        env.call("mounts", {"key": "a-done"})
    # Failed creations leave no directories behind.
    ids = {str(s) for s in _ids(env)}
    assert env.snapshot_dirs() == ids


def _ids(env: Env) -> list[int]:
    import sqlite3

    db = sqlite3.connect(os.path.join(env.root, OVERLAY_ROOT, "metadata.db"))
    try:
        return [row[0] for row in db.execute("select id from snapshots")]
    finally:
        db.close()


def test_remove_refuses_parents_and_removes_leaf_dirs(env: Env) -> None:
    fill_layer(env, "k1", "", {"f": "1"}, "l1")
    env.call("prepare", {"key": "leaf", "parent": "l1"})
    before = env.snapshot_dirs()
    assert len(before) == 2
    with pytest.raises(FailedPrecondition):
        env.call("remove", {"key": "l1"})
    env.call("remove", {"key": "leaf"})
    after = env.snapshot_dirs()
    assert len(after) == 1 and after < before
    with pytest.raises(NotFound):
        env.call("stat", {"key": "leaf"})
    with pytest.raises(NotFound):
        env.call("remove", {"key": "leaf"})
    env.call("remove", {"key": "l1"})
    assert env.snapshot_dirs() == set()


def test_stat_list_update_labels(env: Env) -> None:
    env.call("prepare", {"key": "a", "labels": {"x": "1", "containerd.io/snapshot/keep": "yes"}})
    env.call("commit", {"name": "a-c", "key": "a", "labels": {"committed": "true"}})
    info = env.call("stat", {"key": "a-c"})["info"]
    assert info["labels"] == {"committed": "true"}  # commit replaces labels
    env.call("prepare", {"key": "b", "parent": "a-c", "labels": {"y": "2"}})
    listed = env.call("list", {})["info"]
    assert [(i["name"], i["kind"], i["parent"]) for i in listed] == [("a-c", "committed", ""), ("b", "active", "a-c")]

    base = {"name": "b", "kind": "active"}
    updated = env.call("update", {"info": {**base, "labels": {"z": "3"}}, "update_mask": ["labels.z"]})["info"]
    assert updated["labels"] == {"y": "2", "z": "3"}
    assert updated["updated_at"] >= updated["created_at"]
    updated = env.call("update", {"info": {**base, "labels": {}}, "update_mask": ["labels.y"]})["info"]
    assert updated["labels"] == {"z": "3"}  # absent value removes the label
    updated = env.call("update", {"info": {**base, "labels": {"only": "this"}}, "update_mask": ["labels"]})["info"]
    assert updated["labels"] == {"only": "this"}
    updated = env.call("update", {"info": {**base, "labels": {"all": "new"}}})["info"]
    assert updated["labels"] == {"all": "new"}
    with pytest.raises(InvalidArgument):
        env.call("update", {"info": {**base, "parent": "x"}, "update_mask": ["parent"]})
    with pytest.raises(NotFound):
        env.call("update", {"info": {"name": "ghost", "kind": "active"}})
    assert env.call("stat", {"key": "b"})["info"]["labels"] == {"all": "new"}


def test_snapshot_ref_label_answers_already_exists(env: Env) -> None:
    env.call("prepare", {"key": "extract-1 sha256:abc"})
    env.call("commit", {"name": "sha256:abc", "key": "extract-1 sha256:abc"})
    with pytest.raises(AlreadyExists):
        env.call("prepare", {"key": "extract-2 sha256:abc", "labels": {"containerd.io/snapshot.ref": "sha256:abc"}})
    with pytest.raises(NotFound):
        env.call("stat", {"key": "extract-2 sha256:abc"})


def test_list_filters(env: Env) -> None:
    fill_layer(env, "k1", "", {}, "base")
    env.call("prepare", {"key": "a", "parent": "base", "labels": {"team.x": "blue"}})
    env.call("view", {"key": "v", "parent": "base"})

    def names(*filters: str) -> list[str]:
        return [i["name"] for i in env.call("list", {"filters": list(filters)})["info"]]

    assert names() == ["a", "base", "v"]
    assert names("kind==active") == ["a"]
    assert names("kind==committed", "kind==view") == ["base", "v"]
    assert names("parent==base,kind!=view") == ["a"]
    assert names('labels."team.x"==blue') == ["a"]
    assert names("labels.team.x") == ["a"]
    assert names("name~=^b") == ["base"]
    with pytest.raises(InvalidArgument):
        env.call("list", {"filters": ["kind=="]})


def test_usage_counts_own_files_only(env: Env) -> None:
    fill_layer(env, "k1", "", {"big": "x" * 100_000}, "l1")
    parent_usage = env.call("usage", {"key": "l1"})
    assert parent_usage["size"] >= 100_000 and parent_usage["inodes"] == 2  # fs dir + file
    reply = env.call("prepare", {"key": "child", "parent": "l1"})
    empty = env.call("usage", {"key": "child"})
    assert empty["inodes"] == 1 and empty["size"] < 100_000  # parents excluded
    with mounted(reply["mounts"], parent=env.mount_dir()) as root:
        write(os.path.join(root, "small"), "y" * 10_000)
        os.link(os.path.join(root, "small"), os.path.join(root, "again"))
    grown = env.call("usage", {"key": "child"})
    assert grown["inodes"] == 2 and 10_000 <= grown["size"] < 100_000
    env.call("commit", {"name": "c", "key": "child"})
    assert env.call("usage", {"key": "c"}) == grown


def test_namespaces_are_isolated(env: Env) -> None:
    env.call("prepare", {"key": "same", "labels": {"owner": "a"}}, namespace="ns-a")
    with pytest.raises(NotFound):
        env.call("stat", {"key": "same"}, namespace="ns-b")
    assert env.call("list", {}, namespace="ns-b")["info"] == []
    with pytest.raises(NotFound):
        env.call("prepare", {"key": "x", "parent": "same"}, namespace="ns-b")
    env.call("prepare", {"key": "same", "labels": {"owner": "b"}}, namespace="ns-b")
    assert env.call("stat", {"key": "same"}, namespace="ns-a")["info"]["labels"] == {"owner": "a"}
    assert env.call("stat", {"key": "same"}, namespace="ns-b")["info"]["labels"] == {"owner": "b"}
    env.call("remove", {"key": "same"}, namespace="ns-a")
    assert env.call("stat", {"key": "same"}, namespace="ns-b")["info"]["name"] == "same"
    with pytest.raises(NotFound):
        env.call("stat", {"key": "same"}, namespace="ns-a")


def test_events_are_published(env: Env) -> None:
    env.call("prepare", {"key": "k"}, namespace="evns")
    event = env.next_event()
    assert (event["topic"], event["ns"]) == ("/snapshot/prepare", "evns")
    assert event["event"] == {"key": "k", "parent": "", "snapshotter": "overlayfs"}
    env.call("commit", {"name": "n", "key": "k"}, namespace="evns")
    event = env.next_event()
    assert event["topic"] == "/snapshot/commit" and event["event"]["name"] == "n"
    env.call("remove", {"key": "n"}, namespace="evns")
    assert env.next_event()["topic"] == "/snapshot/remove"


def test_unknown_snapshotter_and_cleanup(env: Env) -> None:
    with pytest.raises(InvalidArgument) as caught:
        env.call("prepare", {"key": "a", "snapshotter": "zfs"})
    assert "zfs" in str(caught.value)
    env.call("prepare", {"key": "keep"})
    snaps = os.path.join(env.root, OVERLAY_ROOT, "snapshots")
    os.makedirs(os.path.join(snaps, "9999", "fs"))
    os.makedirs(os.path.join(snaps, "new-crashed"))
    kept = env.snapshot_dirs() - {"9999", "new-crashed"}
    env.call("cleanup", {})
    assert env.snapshot_dirs() == kept
    assert env.call("stat", {"key": "keep"})["info"]["kind"] == "active"


def test_prepare_replaces_a_directory_left_by_a_crash(env: Env) -> None:
    # A crash between renaming the new directory into place and committing the
    # transaction leaves snapshots/<id> behind while the id goes back to the pool.
    env.call("prepare", {"key": "first"})
    [first_id] = _ids(env)
    stale = os.path.join(env.root, OVERLAY_ROOT, "snapshots", str(first_id + 1))
    os.makedirs(os.path.join(stale, "fs", "stale-dir"))
    write(os.path.join(stale, "fs", "stale-file"), "old")
    reply = env.call("prepare", {"key": "second"})
    assert reply["mounts"][0]["source"] == os.path.join(stale, "fs")
    assert os.listdir(os.path.join(stale, "fs")) == []


def test_long_lowerdir_over_a_page_mounts(env: Env) -> None:
    layers = 0
    parent = ""
    while True:
        name = f"layer-{layers}"
        files = {"lowest": "bottom"} if layers == 0 else {}
        env.call("prepare", {"key": f"work-{layers}", "parent": parent})
        if files:
            with mounted(env.call("mounts", {"key": f"work-{layers}"})["mounts"], parent=env.mount_dir()) as root:
                write(os.path.join(root, "lowest"), "bottom")
        env.call("commit", {"name": name, "key": f"work-{layers}"})
        parent = name
        layers += 1
        probe = env.call("view", {"key": f"probe-{layers}", "parent": parent})["mounts"]
        env.call("remove", {"key": f"probe-{layers}"})
        if layers > 1 and sum(len(o) for o in probe[0]["options"]) > 4096 + 256:
            break
    reply = env.call("prepare", {"key": "top", "parent": parent})
    assert sum(len(o) for o in reply["mounts"][0]["options"]) > 4096
    with mounted(reply["mounts"], parent=env.mount_dir()) as root:
        assert read(os.path.join(root, "lowest")) == "bottom"
        write(os.path.join(root, "top"), "t")
    # The process's working directory was never changed.
    assert os.getcwd() == _CWD


_CWD = os.getcwd()


# -- native ----------------------------------------------------------------------------


def test_native_basic_flow(env: Env) -> None:
    sn = {"snapshotter": "native"}
    reply = env.call("prepare", {"key": "w", **sn})
    [m] = reply["mounts"]
    assert m["type"] == "bind" and "rw" in m["options"]
    with mounted(reply["mounts"], parent=env.mount_dir()) as root:
        write(os.path.join(root, "file"), "native")
        os.chown(os.path.join(root, "file"), 1234, 5678)  # before chmod: chown clears set-id bits
        os.chmod(os.path.join(root, "file"), 0o4750)
        os.symlink("file", os.path.join(root, "link"))
        os.link(os.path.join(root, "file"), os.path.join(root, "hard"))
        os.mkfifo(os.path.join(root, "fifo"))
        os.mknod(os.path.join(root, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mkdir(os.path.join(root, "dir"), 0o711)
        os.setxattr(os.path.join(root, "dir"), "user.note", b"kept")
        os.utime(os.path.join(root, "dir"), (1_000_000, 1_000_000))
    env.call("commit", {"name": "base", "key": "w", **sn})
    child = env.call("prepare", {"key": "c", "parent": "base", **sn})
    assert child["mounts"][0]["source"].endswith(f"/{NATIVE_ROOT}/snapshots/" + os.path.basename(child["mounts"][0]["source"]))
    with mounted(child["mounts"], parent=env.mount_dir()) as root:
        st = os.lstat(os.path.join(root, "file"))
        assert read(os.path.join(root, "file")) == "native"
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 1234, 5678)
        assert os.readlink(os.path.join(root, "link")) == "file"
        assert os.lstat(os.path.join(root, "hard")).st_ino == st.st_ino
        assert stat.S_ISFIFO(os.lstat(os.path.join(root, "fifo")).st_mode)
        null = os.lstat(os.path.join(root, "null"))
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        d = os.lstat(os.path.join(root, "dir"))
        assert stat.S_IMODE(d.st_mode) == 0o711 and int(d.st_mtime) == 1_000_000
        assert os.getxattr(os.path.join(root, "dir"), "user.note") == b"kept"
        write(os.path.join(root, "child-only"), "c")
    # The child's copy is its own: the parent is untouched.
    with mounted(env.call("view", {"key": "v", "parent": "base", **sn})["mounts"], parent=env.mount_dir()) as root:
        assert not os.path.exists(os.path.join(root, "child-only"))
        with pytest.raises(OSError) as caught:
            write(os.path.join(root, "x"), "x")
        assert caught.value.errno == errno.EROFS
    with pytest.raises(NotFound):
        env.call("stat", {"key": "base"})  # overlayfs has no such key
    assert env.call("stat", {"key": "base", **sn})["info"]["kind"] == "committed"
    with pytest.raises(FailedPrecondition):
        env.call("remove", {"key": "base", **sn})
    env.call("remove", {"key": "v", **sn})
    env.call("remove", {"key": "c", **sn})
    env.call("remove", {"key": "base", **sn})
    assert env.snapshot_dirs(NATIVE_ROOT) == set()


# -- linux/mount.py --------------------------------------------------------------------


def test_mount_module_errors_and_unmount_all(env: Env) -> None:
    src = os.path.join(env.base, "src")
    os.makedirs(src)
    target = os.path.join(env.mount_dir(), "t")
    os.makedirs(target)
    with pytest.raises(OSError) as caught:
        linux_mount.mount_all([{"type": "bind", "source": os.path.join(env.base, "absent"), "options": ["rbind"]}], target)
    assert target in str(caught.value)
    # Stacked mounts: unmount_all peels all of them.
    for _ in range(2):
        linux_mount.mount({"type": "bind", "source": src, "options": ["rbind", "ro"]}, target)
    linux_mount.mount_all([Mount(type="bind", source=src, options=["ro", "rbind"])], target)
    assert is_mountpoint(target)
    unmount_all(target)
    assert not is_mountpoint(target)
    linux_mount.unmount(target)  # not mounted: nothing to do
    parsed = linux_mount.parse_options(["ro", "rbind", "rw", "nosuid", "lowerdir=/a", "rprivate"])
    assert parsed.flags & linux_mount.MS_RDONLY == 0
    assert parsed.flags & linux_mount.MS_NOSUID and parsed.flags & linux_mount.MS_BIND
    assert parsed.data == "lowerdir=/a"
    assert parsed.propagation == linux_mount.MS_PRIVATE | linux_mount.MS_REC
