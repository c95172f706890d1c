"""OCI image layouts: the deterministic writer, the busybox image, and the safe reader."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from typing import Iterator

import pytest

from moord.messages.errors import InvalidArgument, NotFound
from moord.oci import image as oci
from moord.oci.busybox import build_busybox_layout
from moord.oci.layout import OciLayout, canonical_json, write_layout


@pytest.fixture
def workdir() -> Iterator[str]:
    """A scratch directory under /tmp."""
    base = tempfile.mkdtemp(prefix="md-layout-", dir="/tmp")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_busybox_layout_is_deterministic_and_complete(workdir: str) -> None:
    first = build_busybox_layout(os.path.join(workdir, "a"))
    second = build_busybox_layout(os.path.join(workdir, "b"))
    assert first == second
    build_busybox_layout(os.path.join(workdir, "a.tar"), tar=True)
    old = os.umask(0o077)  # the umask must not change the tar either
    try:
        build_busybox_layout(os.path.join(workdir, "b.tar"), tar=True)
    finally:
        os.umask(old)
    with open(os.path.join(workdir, "a.tar"), "rb") as fa, open(os.path.join(workdir, "b.tar"), "rb") as fb:
        assert fa.read() == fb.read()

    with OciLayout(os.path.join(workdir, "a")) as layout:
        [img] = list(layout.images())
        assert img.name == "docker.io/library/busybox:latest"
        assert img.target["digest"] == first
        assert img.target["annotations"][oci.REF_NAME_ANNOTATION] == img.name
        _, manifest = layout.read_document(first, img.target["size"], "manifest")
        _, config = layout.read_document(manifest["config"]["digest"], manifest["config"]["size"], "config")
        assert config["config"]["Cmd"] == ["sh"]
        assert any(e.startswith("PATH=") for e in config["config"]["Env"])
        [layer] = manifest["layers"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        with layout.open_blob(layer["digest"], layer["size"]) as reader:
            tar_bytes = gzip.decompress(reader.readall())
    assert config["rootfs"]["diff_ids"] == [sha256(tar_bytes)]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    names = list(members)
    # Depth first, each directory right before its contents, names sorted per directory.
    assert names.index("bin") < names.index("bin/busybox") < names.index("etc")
    assert [n for n in names if "/" not in n] == sorted(n for n in names if "/" not in n)
    busybox = members["bin/busybox"]
    assert busybox.isreg() and busybox.mode == 0o755 and busybox.uid == 0 and busybox.mtime == 0
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["usr/bin/env"].linkname == "../../bin/busybox"
    assert members["tmp"].mode == 0o1777 and members["root"].mode == 0o700
    assert all(m.uname == "" and m.uid == 0 and m.gid == 0 for m in members.values())
    passwd = tar_bytes[members["etc/passwd"].offset_data:][: members["etc/passwd"].size].decode()
    assert passwd.startswith("root:x:0:0:") and "nobody:x:65534:65534:" in passwd
    assert "etc/group" in members


def test_busybox_layout_runs_with_umoci(workdir: str) -> None:
    if not shutil.which("umoci"):
        pytest.skip("umoci not installed")
    path = os.path.join(workdir, "bb")
    build_busybox_layout(path)
    bundle = os.path.join(workdir, "bundle")
    subprocess.run(["umoci", "unpack", "--image", f"{path}:docker.io/library/busybox:latest", bundle], check=True, capture_output=True)
    out = subprocess.run([os.path.join(bundle, "rootfs", "bin", "sh"), "-c", "echo hello"], check=True, capture_output=True, text=True)
    assert out.stdout == "hello\n"


def test_write_layout_keeps_hardlinks_and_adds_refs(workdir: str) -> None:
    rootfs = os.path.join(workdir, "rootfs")
    os.makedirs(os.path.join(rootfs, "a"))
    with open(os.path.join(rootfs, "a", "f"), "w") as fh:
        fh.write("data")
    os.link(os.path.join(rootfs, "a", "f"), os.path.join(rootfs, "g"))
    os.symlink("a/f", os.path.join(rootfs, "s"))
    path = os.path.join(workdir, "layout")
    one = write_layout(rootfs, path, "example.com/one:1", cmd=("/g",), env=("A=1",), mtime=None)
    two = write_layout(rootfs, path, "example.com/two:2", entrypoint=("/bin/x",), working_dir="/a", user="1:1")
    again = write_layout(rootfs, path, "example.com/one:1", cmd=("/g",), env=("A=1",), mtime=None)
    assert again.manifest_digest == one.manifest_digest
    with OciLayout(path) as layout:
        names = {img.name: img.target["digest"] for img in layout.images()}
        assert names == {"example.com/one:1": one.manifest_digest, "example.com/two:2": two.manifest_digest}
        _, config = layout.read_document(two.config_digest, None, "config")
        assert config["config"]["Entrypoint"] == ["/bin/x"] and config["config"]["WorkingDir"] == "/a"
        with layout.open_blob(one.layers[0].digest) as reader:
            data = gzip.decompress(reader.readall())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        kinds = {m.name: (m.type, m.linkname) for m in tar.getmembers()}
    assert kinds["g"] == (tarfile.LNKTYPE, "a/f")
    assert kinds["s"] == (tarfile.SYMTYPE, "a/f")


def test_tag_only_refs_need_a_base_name(workdir: str) -> None:
    rootfs = os.path.join(workdir, "rootfs")
    os.mkdir(rootfs)
    path = os.path.join(workdir, "layout")
    write_layout(rootfs, path, "v1")
    with open(os.path.join(path, "index.json")) as fh:
        index = json.load(fh)
    del index["manifests"][0]["annotations"]["io.containerd.image.name"]
    with open(os.path.join(path, "index.json"), "wb") as fh:
        fh.write(canonical_json(index))
    with OciLayout(path) as layout:
        assert list(layout.images()) == []
        assert [i.name for i in layout.images("example.com/app")] == ["example.com/app:v1"]


# -- hostile layouts -----------------------------------------------------------------


def _layout(workdir: str) -> tuple[str, str]:
    path = os.path.join(workdir, "bb")
    return path, build_busybox_layout(path)


def _tar_of(src: str, out: str, extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> None:  # type: ignore[assignment]
    with tarfile.open(out, "w") as tar:
        tar.add(src, arcname=".")
        for info, data in extra:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_reader_refuses_escaping_tar_members(workdir: str) -> None:
    path, _ = _layout(workdir)
    for bad in ("../evil", "/abs/evil", "blobs/../../evil"):
        out = os.path.join(workdir, "bad.tar")
        _tar_of(path, out, [(tarfile.TarInfo(bad), b"x")])
        with pytest.raises(InvalidArgument, match="leaves the layout"):
            OciLayout(out)
    assert not os.path.exists(os.path.join(os.path.dirname(workdir), "evil"))


def test_reader_reads_a_tar_like_a_directory(workdir: str) -> None:
    path, digest = _layout(workdir)
    out = os.path.join(workdir, "ok.tar")
    _tar_of(path, out)
    with OciLayout(out) as layout:
        [img] = list(layout.images())
        assert img.target["digest"] == digest
        _, manifest = layout.read_document(digest, img.target["size"], "manifest")
        layer = manifest["layers"][0]
        with layout.open_blob(layer["digest"], layer["size"]) as reader:
            assert sha256(reader.readall()) == layer["digest"]
    with open(out, "rb") as fh:
        data = fh.read()
    with open(out + ".gz", "wb") as fh:
        fh.write(gzip.compress(data))
    with pytest.raises(InvalidArgument, match="compressed"):
        OciLayout(out + ".gz")


def test_reader_checks_blobs_against_digests(workdir: str) -> None:
    path, digest = _layout(workdir)
    with OciLayout(path) as layout:
        _, manifest = layout.read_document(digest, None, "manifest")
    layer = manifest["layers"][0]
    blob = os.path.join(path, "blobs", "sha256", layer["digest"][7:])
    with open(blob, "r+b") as fh:
        fh.seek(100)
        fh.write(b"X")
    with OciLayout(path) as layout:
        with pytest.raises(InvalidArgument, match="digest"):
            with layout.open_blob(layer["digest"], layer["size"]) as reader:
                reader.readall()
        with pytest.raises(InvalidArgument, match="bytes"):
            layout.open_blob(layer["digest"], layer["size"] + 1)
        with pytest.raises(InvalidArgument):
            layout.has_blob("sha256:../../etc/passwd")
        with pytest.raises(NotFound):
            layout.open_blob("sha256:" + "0" * 64)


def test_reader_refuses_symlinks_and_oversized_documents(workdir: str) -> None:
    path, digest = _layout(workdir)
    config_blob = os.path.join(path, "blobs", "sha256", digest[7:])
    os.rename(config_blob, config_blob + ".real")
    os.symlink(config_blob + ".real", config_blob)
    with OciLayout(path) as layout:
        with pytest.raises(InvalidArgument, match="symlink"):
            layout.read_document(digest, None, "manifest")
    os.unlink(config_blob)
    os.rename(config_blob + ".real", config_blob)
    with open(os.path.join(path, "index.json"), "wb") as fh:
        fh.write(b" " * (5 * 1024 * 1024))
    with OciLayout(path) as layout:
        with pytest.raises(InvalidArgument, match="limit"):
            layout.index()
    with open(os.path.join(path, "index.json"), "wb") as fh:
        fh.write(canonical_json({"schemaVersion": 2, "manifests": [{"digest": "sha256:xyz", "size": 1}]}))
    with OciLayout(path) as layout:
        with pytest.raises(InvalidArgument, match="invalid digest"):
            list(layout.images())


def test_reader_refuses_non_layouts(workdir: str) -> None:
    with pytest.raises(NotFound):
        OciLayout(os.path.join(workdir, "missing"))
    empty = os.path.join(workdir, "empty")
    os.mkdir(empty)
    with pytest.raises(InvalidArgument, match="not an OCI image layout"):
        OciLayout(empty)
    with open(os.path.join(empty, "oci-layout"), "w") as fh:
        fh.write('{"imageLayoutVersion": "9.9"}')
    with pytest.raises(InvalidArgument, match="version"):
        OciLayout(empty)
    junk = os.path.join(workdir, "junk.tar")
    with open(junk, "wb") as fh:
        fh.write(os.urandom(4096))
    with pytest.raises(InvalidArgument):
        OciLayout(junk)


# -- archive files, references, the archive writer -----------------------------------


def test_archive_files_follow_links_inside_and_refuse_the_rest(workdir: str) -> None:
    from moord.oci.layout import ArchiveFiles

    out = os.path.join(workdir, "links.tar")
    with tarfile.open(out, "w") as tar:
        info = tarfile.TarInfo("a/layer.tar")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
        link = tarfile.TarInfo("b/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../a/layer.tar"
        tar.addfile(link)
        hard = tarfile.TarInfo("c/layer.tar")
        hard.type, hard.linkname = tarfile.LNKTYPE, "a/layer.tar"
        tar.addfile(hard)
        loop = tarfile.TarInfo("loop")
        loop.type, loop.linkname = tarfile.SYMTYPE, "loop"
        tar.addfile(loop)
    with ArchiveFiles(out) as files:
        for name in ("a/layer.tar", "b/layer.tar", "c/layer.tar"):
            stream, size = files.open(name)
            with stream:
                assert (stream.read(), size) == (b"hello", 5)
        assert not files.exists("missing")
        with pytest.raises(InvalidArgument, match="levels of links"):
            files.open("loop")
    for target in ("/etc/shadow", "../../etc/shadow", ".."):
        with tarfile.open(out, "w") as tar:
            link = tarfile.TarInfo("x/layer.tar")
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        with pytest.raises(InvalidArgument, match="outside the archive"):
            ArchiveFiles(out)


def test_archive_files_refuse_members_past_the_end(workdir: str) -> None:
    from moord.oci.layout import ArchiveFiles

    out = os.path.join(workdir, "short.tar")
    with tarfile.open(out, "w") as tar:
        info = tarfile.TarInfo("big")
        info.size = 1024 * 1024
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    with open(out, "r+b") as fh:
        fh.truncate(4096)
    with pytest.raises(InvalidArgument, match="past the end"):
        ArchiveFiles(out)


@pytest.mark.parametrize(
    ("ref", "normal", "familiar", "tag"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest", "latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36", "1.36"),
        ("user/app:v1", "docker.io/user/app:v1", "user/app:v1", "v1"),
        ("index.docker.io/library/x:2", "docker.io/library/x:2", "x:2", "2"),
        ("localhost:5000/a/b:c", "localhost:5000/a/b:c", "localhost:5000/a/b:c", "c"),
        ("example.com/team/app", "example.com/team/app:latest", "example.com/team/app:latest", "latest"),
        ("x@sha256:" + "a" * 64, "docker.io/library/x@sha256:" + "a" * 64, "x@sha256:" + "a" * 64, "@sha256:" + "a" * 64),
    ],
)
def test_docker_references(ref: str, normal: str, familiar: str, tag: str) -> None:
    from moord.oci import docker_archive as docker

    assert docker.normalize_ref(ref) == normal
    assert docker.familiar_ref(normal) == familiar
    assert docker.oci_ref_name(normal) == tag


@pytest.mark.parametrize("bad", ["", "upper/CASE", "a//b", "x:bad tag", "x@sha256:short", "http://x/y", "-x"])
def test_bad_docker_references(bad: str) -> None:
    from moord.oci import docker_archive as docker

    with pytest.raises(InvalidArgument):
        docker.normalize_ref(bad)


def test_archive_writer_is_atomic_and_refuses_to_overwrite(workdir: str) -> None:
    from moord.messages.errors import AlreadyExists
    from moord.oci.layout import ArchiveWriter, Record, bytes_record

    out = os.path.join(workdir, "out.tar")
    writer = ArchiveWriter(out, directory=False)
    writer.write([bytes_record("oci-layout", b"{}"), bytes_record("blobs/sha256/ab", b"x")])
    writer.commit()
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["blobs", "blobs/sha256", "blobs/sha256/ab", "oci-layout"]
    with pytest.raises(AlreadyExists):
        ArchiveWriter(out, directory=False)
    writer = ArchiveWriter(out, directory=False, overwrite=True)
    with pytest.raises(InvalidArgument):
        writer.write([Record("short", 10, lambda: io.BytesIO(b"abc"))])
    writer.abort()
    assert os.listdir(workdir) == ["out.tar"]  # the old file, untouched; no temp left
    with pytest.raises(InvalidArgument):
        ArchiveWriter("relative", directory=True)
    d = os.path.join(workdir, "dir")
    writer = ArchiveWriter(d, directory=True)
    writer.write([bytes_record("blobs/sha256/cd", b"y")])
    writer.commit()
    with open(os.path.join(d, "blobs", "sha256", "cd"), "rb") as fh:
        assert fh.read() == b"y"
    with pytest.raises(AlreadyExists):
        ArchiveWriter(d, directory=True)
    with pytest.raises(InvalidArgument, match="not an OCI image layout"):
        ArchiveWriter(d, directory=True, overwrite=True)
