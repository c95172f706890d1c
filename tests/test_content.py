"""The content actor and the metadata actor behind real Bridges, called with a real Client."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator

import pytest

from tests import test_metadata as metadata_tests  # the metadata host and event exchange stand-in
from moord.actors import content as content_module
from moord.actors.content import ContentActor, content_root
from moord.bus.bridge import Bridge
from moord.bus.client import Client, endpoint_path
from moord.messages.content import MAX_CHUNK_BYTES
from moord.messages.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ContentHost:
    """Metadata and content actors, each behind its own bridge on one ipc dir."""

    def __init__(self) -> None:
        self.meta = metadata_tests.MetadataHost()
        self.root = content_root(self.meta.root)
        self.peer_client = Client(self.meta.ipc_dir, timeout=5)  # the content process's own client
        self.ref = None
        self.bridge: Bridge | None = None

    @property
    def client(self) -> Client:
        return self.meta.client

    def start(self) -> None:
        self.meta.start()
        self.start_content()

    def start_content(self) -> None:
        self.ref = ContentActor.start(self.root, self.peer_client, self.meta.publisher)
        self.bridge = Bridge("content", endpoint_path(self.meta.ipc_dir, "content"))
        self.bridge.serve(self.ref, ContentActor.kinds())
        self.bridge.start()

    def stop_content(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        if self.ref is not None:
            self.ref.stop()
            self.ref = None

    def close(self) -> None:
        self.stop_content()
        self.peer_client.close()
        self.meta.close()

    def call(self, kind: str, payload: dict[str, Any] | None = None, ns: str = "default", frames: tuple = ()) -> dict:
        return self.client.call(kind, payload or {}, namespace=ns, frames=frames)

    def read(self, digest: str, ns: str = "default", offset: int = 0, size: int = 0) -> tuple[dict, bytes]:
        reply, frames = self.client.call_frames(
            "content.read", {"digest": digest, "offset": offset, "size": size}, namespace=ns
        )
        return reply, b"".join(bytes(f) for f in frames)

    def write_blob(
        self, data: bytes, ref: str = "", ns: str = "default", chunk: int = 7, expected: bool = True, labels: dict | None = None
    ) -> dict:
        """stat, write in chunks, commit, as ctr's content writer does."""
        digest = sha(data)
        ref = ref or f"layer-{digest}"
        base = {"ref": ref, "writer": f"w-{ref}", "total": len(data), "expected": digest if expected else ""}
        stat = self.call("content.write", {**base, "action": "stat"}, ns=ns)
        offset = stat["offset"]
        while offset < len(data):
            piece = data[offset : offset + chunk]
            reply = self.call("content.write", {**base, "action": "write", "offset": offset}, ns=ns, frames=(piece,))
            offset = reply["offset"]
        return self.call("content.write", {**base, "action": "commit", "offset": offset, "labels": labels or {}}, ns=ns)


@pytest.fixture
def host() -> Iterator[ContentHost]:
    h = ContentHost()
    try:
        h.start()
        yield h
    finally:
        h.close()


def files_under(path: str) -> set[str]:
    found = set()
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            found.add(os.path.relpath(os.path.join(dirpath, name), path))
    return found


# -- the whole life of a blob ---------------------------------------------------------


def test_write_read_info_update_list_delete(host: ContentHost) -> None:
    data = os.urandom(1000)
    digest = sha(data)
    committed = host.write_blob(data, labels={"containerd.io/distribution.source.docker.io": "library/busybox"})
    assert committed["digest"] == digest and committed["offset"] == 1000
    blob = os.path.join(host.root, "blobs", "sha256", digest[7:])
    with open(blob, "rb") as fh:
        assert fh.read() == data
    assert os.stat(blob).st_mode & 0o222 == 0  # committed blobs are read-only
    assert os.listdir(os.path.join(host.root, "ingest")) == []

    reply, got = host.read(digest)
    assert reply == {"offset": 0, "size": 1000} and got == data
    assert host.read(digest, offset=100, size=50)[1] == data[100:150]
    assert host.read(digest, offset=990, size=50)[1] == data[990:]
    assert host.read(digest, offset=1000)[1] == b""
    with pytest.raises(OutOfRange):
        host.read(digest, offset=1001)

    info = host.call("content.info", {"digest": digest})["info"]
    assert info["size"] == 1000 and info["labels"] == {"containerd.io/distribution.source.docker.io": "library/busybox"}
    upd = {"digest": digest, "size": 1000, "labels": {"containerd.io/gc.ref.content.l.0": sha(b"x")}}
    info = host.call("content.update", {"info": upd, "update_mask": ["labels.containerd.io/gc.ref.content.l.0"]})["info"]
    assert set(info["labels"]) == {"containerd.io/distribution.source.docker.io", "containerd.io/gc.ref.content.l.0"}
    host.write_blob(b"second blob")
    assert [i["digest"] for i in host.call("content.list")["infos"]] == sorted([digest, sha(b"second blob")])
    assert [i["digest"] for i in host.call("content.list", {"filters": ['labels."containerd.io/gc.ref.content.l.0"']})["infos"]] == [digest]

    host.meta.sink.drain(0.1)
    host.call("content.delete", {"digest": digest})
    assert not os.path.exists(blob)
    assert [(t, ns, e) for t, ns, e in host.meta.sink.drain()] == [("/content/delete", "default", {"digest": digest})]
    for kind, payload in (("content.info", {"digest": digest}), ("content.delete", {"digest": digest})):
        with pytest.raises(NotFound):
            host.call(kind, payload)
    with pytest.raises(NotFound):
        host.read(digest)


def test_large_blob_in_max_chunks_and_chunk_limit(host: ContentHost) -> None:
    data = os.urandom(MAX_CHUNK_BYTES + 12345)
    host.write_blob(data, chunk=MAX_CHUNK_BYTES)
    reply, first = host.read(sha(data))
    assert reply["size"] == len(data) and first == data[:MAX_CHUNK_BYTES]
    assert host.read(sha(data), offset=MAX_CHUNK_BYTES, size=len(data))[1] == data[MAX_CHUNK_BYTES:]
    with pytest.raises(InvalidArgument, match="chunk limit"):
        host.call("content.write", {"action": "write", "ref": "big"}, frames=(b"\0" * (MAX_CHUNK_BYTES + 1),))


# -- existing blobs -------------------------------------------------------------------


def test_stat_of_existing_blob(host: ContentHost) -> None:
    data = b"shared layer bytes"
    digest = sha(data)
    host.write_blob(data, ns="a")
    blob = os.path.join(host.root, "blobs", "sha256", digest[7:])
    inode = os.stat(blob).st_ino
    stat = {"action": "stat", "ref": "layer-x", "total": len(data), "expected": digest, "writer": "w1"}
    with pytest.raises(AlreadyExists):
        host.call("content.write", stat, ns="a")
    # another namespace: ownership is added, no bytes are written
    assert host.call("content.list", ns="b")["infos"] == []
    with pytest.raises(AlreadyExists):
        host.call("content.write", stat, ns="b")
    assert host.call("content.info", {"digest": digest}, ns="b")["info"]["size"] == len(data)
    assert os.stat(blob).st_ino == inode
    assert os.listdir(os.path.join(host.root, "ingest")) == []
    assert host.read(digest, ns="b")[1] == data
    # the lock died with the refused session: the same ref can be written again at once
    with pytest.raises(AlreadyExists):
        host.call("content.write", {**stat, "writer": "w2"}, ns="b")
    # committing bytes this namespace already owns answers AlreadyExists too
    with pytest.raises(AlreadyExists):
        host.write_blob(data, ns="a", ref="again", expected=False)
    # deleting from one namespace keeps the blob for the other
    host.call("content.delete", {"digest": digest}, ns="a")
    assert os.path.exists(blob)
    host.call("content.delete", {"digest": digest}, ns="b")
    assert not os.path.exists(blob)


# -- namespaces -----------------------------------------------------------------------


def test_namespace_isolation(host: ContentHost) -> None:
    data = b"only for a"
    digest = sha(data)
    host.write_blob(data, ns="a")
    host.call("content.write", {"action": "write", "ref": "a-ingest", "writer": "wa"}, ns="a", frames=(b"part",))
    assert host.call("content.list", ns="b")["infos"] == []
    assert host.call("content.list_statuses", ns="b")["statuses"] == []
    for kind, payload in (
        ("content.info", {"digest": digest}),
        ("content.delete", {"digest": digest}),
        ("content.update", {"info": {"digest": digest, "size": len(data), "labels": {"x": "y"}}}),
        ("content.status", {"ref": "a-ingest"}),
        ("content.abort", {"ref": "a-ingest"}),
    ):
        with pytest.raises(NotFound):
            host.call(kind, payload, ns="b")
    with pytest.raises(NotFound):
        host.read(digest, ns="b")
    # the same ref in b is b's own ingest, not a's
    host.call("content.write", {"action": "write", "ref": "a-ingest", "writer": "wb"}, ns="b", frames=(b"xy",))
    assert host.call("content.status", {"ref": "a-ingest"}, ns="a")["status"]["offset"] == 4
    assert host.call("content.status", {"ref": "a-ingest"}, ns="b")["status"]["offset"] == 2
    assert host.read(digest, ns="a")[1] == data


# -- ingests --------------------------------------------------------------------------


def test_locked_ref(host: ContentHost, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"locked content"
    digest = sha(data)
    base = {"ref": "layer-locked", "total": len(data), "expected": digest}
    host.call("content.write", {**base, "action": "stat", "writer": "one"})
    for other in ("two", ""):
        with pytest.raises(Unavailable, match="ref layer-locked locked"):
            host.call("content.write", {**base, "action": "stat", "writer": other})
    host.call("content.write", {**base, "action": "write", "writer": "one"}, frames=(data[:5],))
    # close ends the session but keeps the ingest; the other writer resumes it
    host.call("content.write", {**base, "action": "close", "writer": "one"})
    stat = host.call("content.write", {**base, "action": "stat", "writer": "two"})
    assert stat["offset"] == 5
    with pytest.raises(Unavailable):
        host.call("content.write", {**base, "action": "write", "offset": 5, "writer": "one"}, frames=(data[5:],))
    host.call("content.write", {**base, "action": "write", "offset": 5, "writer": "two"}, frames=(data[5:],))
    host.call("content.write", {**base, "action": "commit", "offset": len(data), "writer": "two"})

    # abort releases the lock as well
    host.call("content.write", {"action": "stat", "ref": "r2", "writer": "one"})
    host.call("content.abort", {"ref": "r2"})
    host.call("content.write", {"action": "stat", "ref": "r2", "writer": "two"})
    # a session that went quiet loses its lock
    monkeypatch.setattr(content_module, "INGEST_LOCK_STALE_SECONDS", 0.2)
    with pytest.raises(Unavailable):
        host.call("content.write", {"action": "stat", "ref": "r2", "writer": "three"})
    import time

    time.sleep(0.3)
    host.call("content.write", {"action": "stat", "ref": "r2", "writer": "three"})


def test_offsets(host: ContentHost) -> None:
    base = {"ref": "offsets", "writer": "w"}
    host.call("content.write", {**base, "action": "write"}, frames=(b"hello",))
    with pytest.raises(OutOfRange, match="write @3 must occur at current offset 5"):
        host.call("content.write", {**base, "action": "write", "offset": 3}, frames=(b"x",))
    # the error ended that session; a new one restarts the ingest at offset 0
    reply = host.call("content.write", {**base, "action": "write", "offset": 0}, frames=(b"abc",))
    assert reply["offset"] == 3 and reply["digest"] == sha(b"abc")
    reply = host.call("content.write", {**base, "action": "commit", "offset": 3, "total": 3})
    assert reply["digest"] == sha(b"abc")


def test_resume_after_content_restart(host: ContentHost) -> None:
    data = os.urandom(5000)
    digest = sha(data)
    base = {"ref": "layer-resume", "total": len(data), "expected": digest, "writer": "first"}
    host.call("content.write", {**base, "action": "stat"})
    host.call("content.write", {**base, "action": "write"}, frames=(data[:3000],))
    host.stop_content()
    host.start_content()
    status = host.call("content.status", {"ref": "layer-resume"})["status"]
    assert status["offset"] == 3000 and status["total"] == len(data) and status["expected"] == digest
    stat = host.call("content.write", {**base, "writer": "second", "action": "stat"})
    assert stat["offset"] == 3000 and stat["digest"] == sha(data[:3000])  # rehashed from disk
    host.call("content.write", {**base, "writer": "second", "action": "write", "offset": 3000}, frames=(data[3000:],))
    reply = host.call("content.write", {**base, "writer": "second", "action": "commit", "offset": len(data)})
    assert reply["digest"] == digest
    assert host.read(digest)[1] == data[:MAX_CHUNK_BYTES]


def test_commit_checks_size_and_digest(host: ContentHost) -> None:
    data = b"what was written"
    wrong = sha(b"something else")
    base = {"ref": "mismatch", "writer": "w"}
    host.call("content.write", {**base, "action": "write", "expected": wrong}, frames=(data,))
    with pytest.raises(FailedPrecondition) as info:
        host.call("content.write", {**base, "action": "commit", "offset": len(data)})
    assert sha(data) in info.value.message and wrong in info.value.message
    with pytest.raises(FailedPrecondition, match=f"unexpected commit size {len(data)}, expected 99"):
        host.call("content.write", {**base, "action": "commit", "offset": len(data), "total": 99})
    # the ingest is still there for a retry or an abort
    assert host.call("content.status", {"ref": "mismatch"})["status"]["offset"] == len(data)
    assert not os.path.exists(os.path.join(host.root, "blobs", "sha256", sha(data)[7:]))


def test_statuses_and_abort(host: ContentHost) -> None:
    host.call("content.write", {"action": "stat", "ref": "layer-1", "total": 10})
    host.call("content.write", {"action": "write", "ref": "config-1"}, frames=(b"abc",))
    refs = sorted(s["ref"] for s in host.call("content.list_statuses")["statuses"])
    assert refs == ["config-1", "layer-1"]
    assert [s["ref"] for s in host.call("content.list_statuses", {"filters": ["ref~=^layer-"]})["statuses"]] == ["layer-1"]
    status = host.call("content.status", {"ref": "layer-1"})["status"]
    assert status["total"] == 10 and status["offset"] == 0 and status["started_at"] > 0
    host.call("content.abort", {"ref": "layer-1"})
    with pytest.raises(NotFound):
        host.call("content.abort", {"ref": "layer-1"})
    with pytest.raises(NotFound):
        host.call("content.status", {"ref": "layer-1"})
    with pytest.raises(InvalidArgument):
        host.call("content.list_statuses", {"filters": ["ref=="]})


# -- hostile input --------------------------------------------------------------------

HOSTILE_DIGESTS = ["sha256:../../../../etc/passwd", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:abc", "", "sha256:" + "a" * 64 + "/x"]


@pytest.mark.parametrize("digest", HOSTILE_DIGESTS)
def test_hostile_digests_are_refused(host: ContentHost, digest: str) -> None:
    for kind in ("content.info", "content.delete", "content.read"):
        with pytest.raises(InvalidArgument):
            host.call(kind, {"digest": digest})
    if digest:
        with pytest.raises(InvalidArgument):
            host.call("content.write", {"action": "stat", "ref": "r", "expected": digest})


@pytest.mark.parametrize("ref", ["../../../../tmp/escape", "/etc/passwd", "a/../../b", "nul\0byte", "..", "ünïcode ref\n"])
def test_hostile_refs_stay_inside_the_store(host: ContentHost, ref: str) -> None:
    outside_before = set(os.listdir(os.path.dirname(host.root)))
    host.call("content.write", {"action": "write", "ref": ref, "writer": "w"}, frames=(b"data",))
    assert host.call("content.status", {"ref": ref})["status"]["ref"] == ref
    names = os.listdir(os.path.join(host.root, "ingest"))
    assert len(names) == 1 and len(names[0]) == 64 and all(c in "0123456789abcdef" for c in names[0])
    assert set(os.listdir(os.path.dirname(host.root))) == outside_before
    reply = host.call("content.write", {"action": "commit", "ref": ref, "writer": "w", "offset": 4})
    assert reply["digest"] == sha(b"data")
    assert files_under(host.root) == {os.path.join("blobs", "sha256", sha(b"data")[7:])}


@pytest.mark.parametrize("ref", ["", "x" * 513])
def test_ref_bounds(host: ContentHost, ref: str) -> None:
    with pytest.raises(InvalidArgument):
        host.call("content.write", {"action": "stat", "ref": ref})
