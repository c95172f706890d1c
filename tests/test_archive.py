"""docker-archive import, export (OCI layout tar/dir, docker-archive), check and usage,
against the real metadata, content, snapshotter and images actors (in this process,
behind real bridges, as tests/test_images.py hosts them)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from typing import Any, Iterator

import pytest

from moord.messages.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from moord.oci import docker_archive as docker
from moord.oci import image as oci
from moord.oci.busybox import build_busybox_layout
from moord.oci.layout import OciLayout, canonical_json
from tests.test_images import NS, Stack, _host, _missing_subsystems

REF = "docker.io/library/busybox:latest"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """metadata, content, snapshotter and images, each behind its own bridge."""
    missing = _missing_subsystems()
    if missing:
        pytest.skip(f"subsystems not written yet: {missing}")
    yield from _host({
        "metadata": "moord.actors.metadata",
        "content": "moord.actors.content",
        "snapshotter": "moord.actors.snapshotter",
        "images": "moord.actors.images",
    })


@pytest.fixture(scope="module")
def layout(stack: Stack) -> str:
    path = os.path.join(stack.base, "busybox")
    build_busybox_layout(path, ref=REF)
    return path


@pytest.fixture(scope="module")
def parts(layout: str) -> dict[str, Any]:
    """The busybox image's config bytes, its gzip layer and that layer uncompressed."""
    with OciLayout(layout) as lay:
        [img] = list(lay.images())
        _, manifest = lay.read_document(img.target["digest"], None, "manifest")
        config_bytes, _ = lay.read_document(manifest["config"]["digest"], None, "config")
        with lay.open_blob(manifest["layers"][0]["digest"]) as reader:
            gz = reader.readall()
    config = json.loads(config_bytes)
    return {"config": config_bytes, "gz": gz, "tar": gzip.decompress(gz), "diff_id": config["rootfs"]["diff_ids"][0]}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    tar.addfile(info)


def docker_save(path: str, parts: dict[str, Any], images: list[dict[str, Any]] | None = None, extra: Any = None) -> str:
    """Write a `docker save`-shaped tar: <id>.json configs, <id>/layer.tar, manifest.json."""
    config_name = _sha(parts["config"])[7:] + ".json"
    layer_dir = parts["diff_id"][7:]
    images = images or [{"Config": config_name, "RepoTags": ["busybox:latest"], "Layers": [f"{layer_dir}/layer.tar"]}]
    with tarfile.open(path, "w") as tar:
        _add(tar, config_name, parts["config"])
        _add(tar, f"{layer_dir}/layer.tar", parts["tar"])
        _add(tar, f"{layer_dir}/VERSION", b"1.0")
        _add(tar, "repositories", json.dumps({"busybox": {"latest": layer_dir}}).encode())
        if extra:
            extra(tar)
        _add(tar, "manifest.json", json.dumps(images).encode())
    return path


def _contents(stack: Stack) -> set[str]:
    return {i["digest"] for i in stack.call("content.list", {})["infos"]}


def _read_json(stack: Stack, digest: str) -> dict[str, Any]:
    _, frames = stack.client.call_frames("content.read", {"digest": digest}, namespace=NS)
    return json.loads(bytes(frames[0]))


# -- docker-archive import ------------------------------------------------------------


def test_docker_archive_import_converts_to_schema2(stack: Stack, parts: dict[str, Any]) -> None:
    path = docker_save(os.path.join(stack.base, "docker.tar"), parts, [{
        "Config": _sha(parts["config"])[7:] + ".json",
        "RepoTags": ["busybox:latest", "example.com/team/app:1"],
        "Layers": [parts["diff_id"][7:] + "/layer.tar"],
    }])
    reply = stack.call("transfer.import", {"path": path}, timeout=300)
    assert reply["format"] == "docker"
    assert [i["name"] for i in reply["images"]] == [REF, "example.com/team/app:1"]
    target = reply["images"][0]["target"]
    assert target["media_type"] == oci.MEDIA_TYPE_DOCKER_MANIFEST
    manifest = _read_json(stack, target["digest"])
    assert manifest["mediaType"] == oci.MEDIA_TYPE_DOCKER_MANIFEST
    assert manifest["config"] == {"mediaType": oci.MEDIA_TYPE_DOCKER_CONFIG, "digest": _sha(parts["config"]), "size": len(parts["config"])}
    assert manifest["layers"] == [{"mediaType": docker.MEDIA_TYPE_DOCKER_LAYER, "digest": parts["diff_id"], "size": len(parts["tar"])}]
    labels = stack.call("content.info", {"digest": target["digest"]})["info"]["labels"]
    assert labels["containerd.io/gc.ref.content.l.0"] == parts["diff_id"]
    chain = oci.chain_ids([parts["diff_id"]])[-1]
    assert stack.call("snapshots.stat", {"snapshotter": "overlayfs", "key": chain})["info"]["kind"] == "committed"


def test_multi_image_archive_with_symlinked_and_compressed_layers(stack: Stack, parts: dict[str, Any]) -> None:
    config_name = _sha(parts["config"])[7:] + ".json"

    def extra(tar: tarfile.TarFile) -> None:
        _link(tar, "second/layer.tar", f"../{parts['diff_id'][7:]}/layer.tar")  # docker's dedup
        _add(tar, "third/layer.tar.gz", parts["gz"])

    images = [
        {"Config": config_name, "RepoTags": ["example.com/one:1"], "Layers": [parts["diff_id"][7:] + "/layer.tar"]},
        {"Config": config_name, "RepoTags": ["example.com/two:1"], "Layers": ["second/layer.tar"]},
        {"Config": config_name, "RepoTags": ["example.com/three:1"], "Layers": ["third/layer.tar.gz"]},
    ]
    path = docker_save(os.path.join(stack.base, "multi.tar"), parts, images, extra)
    reply = stack.call("transfer.import", {"path": path, "unpack": False}, timeout=300)
    by_name = {i["name"]: i["target"]["digest"] for i in reply["images"]}
    assert by_name["example.com/one:1"] == by_name["example.com/two:1"]
    third = _read_json(stack, by_name["example.com/three:1"])
    assert third["layers"][0]["mediaType"] == oci.MEDIA_TYPE_DOCKER_LAYER_GZIP
    assert third["layers"][0]["digest"] == _sha(parts["gz"])


def _hostile_cases(parts: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    config_name = _sha(parts["config"])[7:] + ".json"
    layer = parts["diff_id"][7:] + "/layer.tar"

    def entry(layers: list[str], config: str = config_name) -> list[dict[str, Any]]:
        return [{"Config": config, "RepoTags": ["example.com/hostile:1"], "Layers": layers}]

    wrong_config = json.loads(parts["config"])
    wrong_config["rootfs"]["diff_ids"] = ["sha256:" + "1" * 64]
    return {
        "escaping member": (lambda t: _add(t, "../evil", b"x"), "leaves the layout"),
        "absolute symlink": (lambda t: _link(t, "evil/layer.tar", "/etc/shadow"), "outside the archive"),
        "escaping symlink": (lambda t: _link(t, "evil/layer.tar", "../../etc/shadow"), "outside the archive"),
        "missing layer": (entry(["nothere/layer.tar"]), "lacks"),
        "huge manifest.json": ([{"Config": config_name, "RepoTags": ["x" * 100], "Layers": [layer]}] * 50_000, "limit"),
        "not a list": ({"Config": config_name}, "list"),
        "wrong diff id": (
            (entry([layer], "wrong.json"), lambda t: _add(t, "wrong.json", canonical_json(wrong_config))), "config says",
        ),
        "config not json": ((entry([layer], "bad.json"), lambda t: _add(t, "bad.json", b"{nope")), "JSON"),
        "diff ids short": (
            (entry([layer, layer]), None), "diff ids",
        ),
    }


def test_hostile_docker_archives_are_refused_and_nothing_is_committed(stack: Stack, parts: dict[str, Any]) -> None:
    before = _contents(stack)
    images_before = stack.call("images.list", {})["images"]
    for case, (spec, message) in _hostile_cases(parts).items():
        path = os.path.join(stack.base, "hostile.tar")
        if callable(spec):
            docker_save(path, parts, extra=spec)
        elif isinstance(spec, tuple):
            manifest, extra = spec
            docker_save(path, parts, manifest, extra)
        else:
            docker_save(path, parts, spec)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=message):
            stack.call("transfer.import", {"path": path}, timeout=60)
        assert _contents(stack) == before, case
    # A member claiming more bytes than the file has.
    path = docker_save(os.path.join(stack.base, "truncated.tar"), parts)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(InvalidArgument):
        stack.call("transfer.import", {"path": path}, timeout=60)
    assert _contents(stack) == before
    assert stack.call("images.list", {})["images"] == images_before
    # Still serving: a good archive imports.
    good = docker_save(os.path.join(stack.base, "good.tar"), parts)
    assert stack.call("transfer.import", {"path": good, "unpack": False}, timeout=60)["images"][0]["name"] == REF


def test_an_archive_that_is_neither_format_is_refused(stack: Stack) -> None:
    path = os.path.join(stack.base, "neither.tar")
    with tarfile.open(path, "w") as tar:
        _add(tar, "hello.txt", b"hi")
    with pytest.raises(InvalidArgument, match="neither an OCI image layout"):
        stack.call("transfer.import", {"path": path})


# -- export ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busybox(stack: Stack, layout: str) -> dict[str, Any]:
    """busybox imported from the OCI layout: its image record."""
    [image] = stack.call("transfer.import", {"path": layout}, timeout=300)["images"]
    return image


def _tar_names(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def _tar_json(path: str, name: str) -> Any:
    with tarfile.open(path) as tar:
        return json.load(tar.extractfile(name))  # type: ignore[arg-type]


def test_export_oci_tar_as_containerd_writes_it_and_import_it_back(stack: Stack, busybox: dict[str, Any]) -> None:
    out = os.path.join(stack.base, "export-oci.tar")
    reply = stack.call("transfer.export", {"names": [REF], "path": out}, timeout=120)
    assert reply["format"] == "oci" and reply["blobs"] == 3
    names = _tar_names(out)
    assert {"oci-layout", "index.json", "manifest.json"} <= set(names)
    index = _tar_json(out, "index.json")
    [entry] = index["manifests"]
    assert entry["digest"] == busybox["target"]["digest"]
    assert entry["annotations"] == {"io.containerd.image.name": REF, "org.opencontainers.image.ref.name": "latest"}
    [docker_entry] = _tar_json(out, "manifest.json")
    assert docker_entry["RepoTags"] == ["busybox:latest"]
    assert docker_entry["Config"].startswith("blobs/sha256/")
    with pytest.raises(AlreadyExists):
        stack.call("transfer.export", {"names": [REF], "path": out})
    stack.call("transfer.export", {"names": [REF], "path": out, "overwrite": True}, timeout=120)
    other = stack.client.call("transfer.import", {"path": out}, namespace="md-other", timeout=300)
    assert other["images"][0]["target"]["digest"] == busybox["target"]["digest"]
    assert other["format"] == "oci"


def test_export_directory_and_docker_archive(stack: Stack, busybox: dict[str, Any], parts: dict[str, Any]) -> None:
    out = os.path.join(stack.base, "export-dir")
    stack.call("transfer.export", {"names": [REF], "path": out, "directory": True}, timeout=120)
    with OciLayout(out) as lay:
        [img] = list(lay.images())
        assert img.name == REF
    assert not [n for n in os.listdir(stack.base) if n.startswith(".export")]
    stack.call("images.create", {"image": {"name": "example.com/copy:2", "target": busybox["target"]}})
    with pytest.raises(AlreadyExists):
        stack.call("transfer.export", {"names": ["example.com/copy:2"], "path": out, "directory": True})
    stack.call("transfer.export", {"names": ["example.com/copy:2"], "path": out, "directory": True, "overwrite": True})
    with OciLayout(out) as lay:
        assert sorted(img.name for img in lay.images()) == [REF, "example.com/copy:2"]
    tar = os.path.join(stack.base, "export-docker.tar")
    stack.call("transfer.export", {"names": [REF], "path": tar, "format": "docker"}, timeout=120)
    layer_member = parts["diff_id"][7:] + "/layer.tar"
    assert set(_tar_names(tar)) >= {"manifest.json", "repositories", layer_member}
    with tarfile.open(tar) as t:
        assert _sha(t.extractfile(layer_member).read()) == parts["diff_id"]  # type: ignore[union-attr]
    assert _tar_json(tar, "manifest.json")[0]["RepoTags"] == ["busybox:latest"]
    back = stack.client.call("transfer.import", {"path": tar}, namespace="md-docker", timeout=300)
    assert back["format"] == "docker" and back["images"][0]["name"] == REF
    with pytest.raises(InvalidArgument):
        stack.call("transfer.export", {"names": [REF], "path": "relative.tar"})
    with pytest.raises(InvalidArgument, match="daemon's root"):
        stack.call("transfer.export", {"names": [REF], "path": os.path.join(stack.config.root, "x.tar")})
    with pytest.raises(NotFound):
        stack.call("transfer.export", {"names": ["example.com/nope:1"], "path": os.path.join(stack.base, "n.tar")})
    assert not os.path.exists(os.path.join(stack.base, "n.tar"))


def test_export_skips_other_platforms_that_are_missing(stack: Stack, busybox: dict[str, Any]) -> None:
    host = oci.host_platform()
    other = {"os": "linux", "architecture": "s390x" if host["architecture"] != "s390x" else "amd64"}
    index = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_INDEX,
        "manifests": [
            {**_wire_to_oci(busybox["target"]), "platform": host},
            {"mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 500, "platform": other},
        ],
    }
    data = canonical_json(index)
    digest = _sha(data)
    ref = "ingest-" + digest[7:19]
    stack.call("content.write", {"action": "stat", "ref": ref, "total": len(data), "expected": digest})
    stack.client.call("content.write", {"action": "write", "ref": ref, "offset": 0}, frames=[data], namespace=NS)
    stack.call("content.write", {"action": "commit", "ref": ref, "offset": len(data), "total": len(data), "expected": digest})
    name = "example.com/multi:1"
    stack.call("images.create", {"image": {"name": name, "target": {"media_type": oci.MEDIA_TYPE_OCI_INDEX, "digest": digest, "size": len(data)}}})
    out = os.path.join(stack.base, "multi-export.tar")
    reply = stack.call("transfer.export", {"names": [name], "path": out}, timeout=120)
    assert reply["blobs"] == 4  # the index, and the host's manifest, config and layer
    with pytest.raises(NotFound, match="2222"):
        stack.call("transfer.export", {"names": [name], "path": out, "overwrite": True, "all_platforms": True})
    with pytest.raises(NotFound):
        stack.call("transfer.export", {"names": [name], "path": out, "overwrite": True, "platforms": [f"linux/{other['architecture']}"]})
    [checked] = stack.call("transfer.check", {"filters": [f"name=={name}"]})["images"]
    assert checked["available"] and not checked["missing"] and checked["unpacked"]
    [elsewhere] = stack.call("transfer.check", {"filters": [f"name=={name}"], "platform": f"linux/{other['architecture']}"})["images"]
    assert not elsewhere["available"]


def _wire_to_oci(desc: dict[str, Any]) -> dict[str, Any]:
    return {"mediaType": desc["media_type"], "digest": desc["digest"], "size": desc["size"]}


# -- check and usage ------------------------------------------------------------------------


def test_check_and_usage(stack: Stack, busybox: dict[str, Any], parts: dict[str, Any]) -> None:
    [checked] = stack.call("transfer.check", {"filters": [f"name=={REF}"]})["images"]
    assert checked["available"] and checked["unpacked"] and not checked["missing"]
    assert len(checked["required"]) == len(checked["present"]) == 2
    usage = stack.call("transfer.usage", {"name": REF})
    manifest = _read_json(stack, busybox["target"]["digest"])
    expected = busybox["target"]["size"] + manifest["config"]["size"] + manifest["layers"][0]["size"]
    assert (usage["content_size"], usage["blobs"], usage["missing"]) == (expected, 3, 0)
    assert usage["snapshots"] == 1 and usage["snapshot_size"] > len(parts["tar"]) // 2
    [native] = stack.call("transfer.check", {"filters": [f"name=={REF}"], "snapshotter": "native"})["images"]
    assert not native["unpacked"]


def test_check_reports_missing_layers(stack: Stack, parts: dict[str, Any]) -> None:
    ns = "md-missing"
    path = docker_save(os.path.join(stack.base, "missing.tar"), parts)
    [image] = stack.client.call("transfer.import", {"path": path, "unpack": False}, namespace=ns, timeout=60)["images"]
    stack.client.call("content.delete", {"digest": parts["diff_id"]}, namespace=ns)
    [checked] = stack.client.call("transfer.check", {}, namespace=ns)["images"]
    assert checked["available"] and [m["digest"] for m in checked["missing"]] == [parts["diff_id"]]
    usage = stack.client.call("transfer.usage", {"name": image["name"]}, namespace=ns)
    assert usage["missing"] == 1 and usage["snapshots"] == 0
    with pytest.raises((NotFound, FailedPrecondition)):
        stack.client.call("transfer.export", {"names": [image["name"]], "path": os.path.join(stack.base, "m.tar")}, namespace=ns)
    assert not os.path.exists(os.path.join(stack.base, "m.tar"))
