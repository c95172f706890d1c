"""Import and unpack against the real metadata, content and snapshotter actors.

Each subsystem runs in this test process behind its own real Bridge on a temp ipc
dir, started through its module's `start(proc)` exactly as its OS process would; the
calls go over real ZeroMQ. Snapshots are real overlayfs (and native) directories and
every view is really mounted.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from moord.bus.bridge import Bridge
from moord.bus.client import Client, endpoint_path
from moord.bus.events import EventPublisher
from moord.config.model import Config
from moord.linux.mount import mounted
from moord.messages.errors import FailedPrecondition, InvalidArgument, NotFound
from moord.oci import image as oci
from moord.oci.busybox import build_busybox_layout
from moord.oci.layout import canonical_json
from moord.supervisor.process import ProcessContext

NS = "md-test"
REF = "docker.io/library/busybox:latest"
SUBSYSTEMS = {
    "metadata": "moord.actors.metadata",
    "content": "moord.actors.content",
    "snapshotter": "moord.actors.snapshotter",
    "images": "moord.actors.images",
}


def _missing_subsystems() -> list[str]:
    missing = []
    for module in SUBSYSTEMS.values():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        if not hasattr(mod, "start"):
            missing.append(module)
    return missing




@dataclass
class Stack:
    """The four processes' actors, hosted here, and a client to them."""

    base: str
    config: Config
    client: Client
    procs: list[ProcessContext] = field(default_factory=list)

    def call(self, kind: str, payload: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.client.call(kind, payload, namespace=NS, **kw)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """metadata, content, snapshotter and images, each behind its own bridge."""
    missing = _missing_subsystems()
    if missing:
        pytest.skip(f"subsystems not written yet: {missing}")
    yield from _host(SUBSYSTEMS)


@pytest.fixture(scope="module")
def snapshotter_only() -> Iterator[Stack]:
    """Just the snapshotter, for the applier-on-snapshot-mounts path."""
    yield from _host({"snapshotter": SUBSYSTEMS["snapshotter"]})


def _host(subsystems: dict[str, str]) -> Iterator[Stack]:
    base = tempfile.mkdtemp(prefix="md-img-", dir="/tmp")
    config = Config(root=os.path.join(base, "root"), state=os.path.join(base, "state"))
    os.makedirs(config.ipc_dir, mode=0o700)
    client = Client(config.ipc_dir, namespace=NS, timeout=30)
    st = Stack(base, config, client)
    try:
        for name, module in subsystems.items():
            bridge = Bridge(name, endpoint_path(config.ipc_dir, name))
            proc = ProcessContext(name, config, bridge, Client(config.ipc_dir), EventPublisher(config.ipc_dir))
            st.procs.append(proc)
            importlib.import_module(module).start(proc)  # type: ignore[attr-defined]
            bridge.start()
        yield st
    finally:
        for proc in reversed(st.procs):
            proc.bridge.stop()
            for ref in proc.actors:
                ref.stop(block=True, timeout=10)
        # Anything still mounted below base would make rmtree reach into it: refuse.
        with open("/proc/self/mountinfo") as fh:
            leaks = [line.split()[4] for line in fh if base in line.split()[4]]
        assert not leaks, f"mounts left behind: {leaks}"
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def layout(stack: Stack) -> str:
    path = os.path.join(stack.base, "busybox")
    build_busybox_layout(path, ref=REF)
    return path


def _info(stack: Stack, digest: str) -> dict[str, Any]:
    return stack.call("content.info", {"digest": digest})["info"]


def _read_json(stack: Stack, digest: str) -> dict[str, Any]:
    reply, frames = stack.client.call_frames("content.read", {"digest": digest}, namespace=NS)
    return json.loads(bytes(frames[0]))


def _view(stack: Stack, chain: str, snapshotter: str = "overlayfs"):  # type: ignore[no-untyped-def]
    """Mount a view of a committed snapshot; yields the mount path (view removed after)."""
    import contextlib

    @contextlib.contextmanager
    def run() -> Iterator[str]:
        key = f"view-{time.time_ns()}"
        mounts = stack.call("snapshots.view", {"snapshotter": snapshotter, "key": key, "parent": chain})["mounts"]
        try:
            with mounted(mounts) as target:
                yield target
        finally:
            stack.call("snapshots.remove", {"snapshotter": snapshotter, "key": key})

    return run()


def _no_active_extracts(stack: Stack, snapshotter: str = "overlayfs") -> None:
    infos = stack.call("snapshots.list", {"snapshotter": snapshotter})["info"]
    assert not [i["name"] for i in infos if i["name"].startswith("extract-")]


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_import_busybox_and_unpack(stack: Stack, layout: str, snapshotter: str) -> None:
    reply = stack.call("transfer.import", {"path": layout, "snapshotter": snapshotter}, timeout=300)
    [image] = reply["images"]
    assert image["name"] == REF
    assert stack.call("images.get", {"name": REF})["image"]["target"]["digest"] == image["target"]["digest"]

    manifest_digest = image["target"]["digest"]
    manifest = _read_json(stack, manifest_digest)
    config = _read_json(stack, manifest["config"]["digest"])
    layer = manifest["layers"][0]
    labels = _info(stack, manifest_digest)["labels"]
    assert labels["containerd.io/gc.ref.content.config"] == manifest["config"]["digest"]
    assert labels["containerd.io/gc.ref.content.l.0"] == layer["digest"]
    diff_id = config["rootfs"]["diff_ids"][0]
    assert _info(stack, layer["digest"])["labels"]["containerd.io/uncompressed"] == diff_id
    chain = oci.chain_ids(config["rootfs"]["diff_ids"])[-1]
    assert _info(stack, manifest["config"]["digest"])["labels"][f"containerd.io/gc.ref.snapshot.{snapshotter}"] == chain
    info = stack.call("snapshots.stat", {"snapshotter": snapshotter, "key": chain})["info"]
    assert info["kind"] == "committed"
    _no_active_extracts(stack, snapshotter)

    with _view(stack, chain, snapshotter) as rootfs:
        st = os.lstat(os.path.join(rootfs, "bin", "busybox"))
        assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o111
        assert os.readlink(os.path.join(rootfs, "bin", "sh")) == "busybox"
        assert stat.S_IMODE(os.stat(os.path.join(rootfs, "tmp")).st_mode) == 0o1777
        with open(os.path.join(rootfs, "etc", "passwd")) as fh:
            assert fh.read().startswith("root:x:0:0:")

    # Unpacking again finds every layer already there.
    again = stack.call("transfer.unpack", {"name": REF, "snapshotter": snapshotter}, timeout=120)
    assert again == {"chain_id": chain, "layers_applied": 0}


def test_reimport_from_tar_updates_the_image(stack: Stack, layout: str) -> None:
    tar_path = os.path.join(stack.base, "busybox-renamed.tar")
    build_busybox_layout(tar_path, ref=REF, tar=True)
    first = stack.call("transfer.import", {"path": tar_path, "unpack": False}, timeout=300)["images"][0]
    second = stack.call("transfer.import", {"path": tar_path}, timeout=300)["images"][0]
    assert first["target"] == second["target"]
    assert second["updated_at"] >= first["updated_at"]


# -- a hand-made two-layer image with whiteouts ---------------------------------------


def _add_blob(path: str, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(path, "blobs", "sha256", digest[7:]), "wb") as fh:
        fh.write(data)
    return {"digest": digest, "size": len(data)}


def _tar(entries: list[tuple[str, bytes, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _layered_layout(stack: Stack, name: str, ref: str, wrong_diff_id: bool = False) -> str:
    """A layout whose image is busybox's layer plus a layer that deletes and adds files."""
    base_layout = os.path.join(stack.base, f"{name}-base")
    build_busybox_layout(base_layout, ref=ref)
    with open(os.path.join(base_layout, "index.json")) as fh:
        index = json.load(fh)
    bb_desc = index["manifests"][0]
    with open(os.path.join(base_layout, "blobs", "sha256", bb_desc["digest"][7:])) as fh:
        bb_manifest = json.load(fh)
    with open(os.path.join(base_layout, "blobs", "sha256", bb_manifest["config"]["digest"][7:])) as fh:
        bb_config = json.load(fh)
    top = _tar([
        (".wh.linuxrc", tarfile.REGTYPE, b""),
        ("etc", tarfile.DIRTYPE, None),
        ("etc/.wh..wh..opq", tarfile.REGTYPE, b""),
        ("etc/hostname", tarfile.REGTYPE, b"layered\n"),
        ("hello", tarfile.REGTYPE, b"hello from layer 2\n"),
    ])
    top_gz = gzip.compress(top, mtime=0)
    layer = {"mediaType": oci.MEDIA_TYPE_OCI_LAYER_GZIP, **_add_blob(base_layout, top_gz)}
    diff_id = "sha256:" + hashlib.sha256(top).hexdigest()
    if wrong_diff_id:
        diff_id = "sha256:" + "0" * 64
    config = dict(bb_config, rootfs={"type": "layers", "diff_ids": [*bb_config["rootfs"]["diff_ids"], diff_id]})
    config_desc = {"mediaType": oci.MEDIA_TYPE_OCI_CONFIG, **_add_blob(base_layout, canonical_json(config))}
    manifest = dict(bb_manifest, config=config_desc, layers=[*bb_manifest["layers"], layer])
    manifest_desc = {"mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, **_add_blob(base_layout, canonical_json(manifest))}
    # An index of two platforms, one of them absent from the layout (as after a single-platform pull).
    other = {"mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 1, "platform": {"os": "linux", "architecture": "s390x"}}
    nested = {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX, "manifests": [dict(manifest_desc, platform=oci.host_platform()), other]}
    nested_desc = {"mediaType": oci.MEDIA_TYPE_OCI_INDEX, **_add_blob(base_layout, canonical_json(nested))}
    index["manifests"] = [dict(nested_desc, annotations={oci.REF_NAME_ANNOTATION: ref})]
    with open(os.path.join(base_layout, "index.json"), "wb") as fh:
        fh.write(canonical_json(index))
    return base_layout


def test_two_layers_with_whiteouts_through_an_index(stack: Stack) -> None:
    ref = "example.com/layered:1"
    path = _layered_layout(stack, "layered", ref)
    [image] = stack.call("transfer.import", {"path": path}, timeout=300)["images"]
    assert image["target"]["media_type"] == oci.MEDIA_TYPE_OCI_INDEX
    index_labels = _info(stack, image["target"]["digest"])["labels"]
    assert index_labels["containerd.io/gc.ref.content.m.1"] == "sha256:" + "1" * 64  # dangling, as containerd
    reply = stack.call("transfer.unpack", {"name": ref}, timeout=120)
    assert reply["layers_applied"] == 0  # import unpacked it already
    with _view(stack, reply["chain_id"]) as rootfs:
        assert not os.path.lexists(os.path.join(rootfs, "linuxrc"))
        assert sorted(os.listdir(os.path.join(rootfs, "etc"))) == ["hostname"]
        with open(os.path.join(rootfs, "hello")) as fh:
            assert fh.read() == "hello from layer 2\n"
        assert os.path.exists(os.path.join(rootfs, "bin", "busybox"))
    _no_active_extracts(stack)


def test_diff_id_mismatch_fails_and_cleans_up(stack: Stack) -> None:
    ref = "example.com/broken:1"
    path = _layered_layout(stack, "broken", ref, wrong_diff_id=True)
    with pytest.raises(FailedPrecondition, match="diff id"):
        stack.call("transfer.import", {"path": path}, timeout=300)
    _no_active_extracts(stack)


def test_import_refuses_bad_paths(stack: Stack) -> None:
    with pytest.raises(NotFound):
        stack.call("transfer.import", {"path": os.path.join(stack.base, "nope")})
    with pytest.raises(InvalidArgument):
        stack.call("transfer.import", {"path": "relative/path"})
    with pytest.raises(InvalidArgument):
        stack.call("transfer.import", {"path": stack.base})  # a directory, not a layout
    with pytest.raises(NotFound):
        stack.call("transfer.unpack", {"name": "example.com/never:imported"})


def test_layer_read_paths_measured(stack: Stack) -> None:
    """Reading a layer blob: straight from the blob file versus content.read over ZeroMQ."""
    from moord.actors import images

    data = os.urandom(64 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    session = images.Session(stack.client, NS, "")
    images.write_blob(session, digest, len(data), lambda: io.BytesIO(data), {})

    start = time.perf_counter()
    with images.ContentStream(session, digest) as stream:
        via_zmq = hashlib.sha256()
        while chunk := stream.read(1024 * 1024):
            via_zmq.update(chunk)
    zmq_seconds = time.perf_counter() - start

    start = time.perf_counter()
    stream, direct = images.open_layer(session, stack.config.root, {"digest": digest, "size": len(data)})
    with stream:
        via_file = hashlib.sha256()
        while chunk := stream.read(1024 * 1024):
            via_file.update(chunk)
    file_seconds = time.perf_counter() - start

    assert direct
    assert "sha256:" + via_zmq.hexdigest() == digest == "sha256:" + via_file.hexdigest()
    print(f"\n64 MiB layer read: content.read {zmq_seconds:.3f}s ({64 / zmq_seconds:.0f} MiB/s), "
          f"blob file {file_seconds:.3f}s ({64 / file_seconds:.0f} MiB/s)")
    stack.call("content.delete", {"digest": digest})


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_apply_onto_snapshot_mounts(snapshotter_only: Stack, snapshotter: str) -> None:
    """Layers applied onto real prepared snapshots: overlay upperdir, or mounted binds."""
    from moord.actors import images

    stack = snapshotter_only
    lower = _tar([("keep", tarfile.REGTYPE, b"k"), ("gone", tarfile.REGTYPE, b"g"), ("d", tarfile.DIRTYPE, None), ("d/old", tarfile.REGTYPE, b"o")])
    upper = _tar([(".wh.gone", tarfile.REGTYPE, b""), ("d/.wh..wh..opq", tarfile.REGTYPE, b""), ("d/new", tarfile.REGTYPE, b"n")])
    parent = ""
    for i, layer in enumerate((lower, upper)):
        key = f"extract-{i}-{snapshotter}"
        mounts = stack.call("snapshots.prepare", {"snapshotter": snapshotter, "key": key, "parent": parent})["mounts"]
        result = images.apply_onto_mounts(io.BytesIO(gzip.compress(layer)), mounts)
        assert result.diff_id == "sha256:" + hashlib.sha256(layer).hexdigest()
        name = f"layer-{i}-{snapshotter}"
        stack.call("snapshots.commit", {"snapshotter": snapshotter, "name": name, "key": key})
        parent = name
    with _view(stack, parent, snapshotter) as rootfs:
        assert sorted(os.listdir(rootfs)) == ["d", "keep"]
        assert os.listdir(os.path.join(rootfs, "d")) == ["new"]
    for name in (f"layer-1-{snapshotter}", f"layer-0-{snapshotter}"):
        stack.call("snapshots.remove", {"snapshotter": snapshotter, "key": name})
