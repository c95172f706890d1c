"""The layer applier: formats, metadata, whiteouts, and a corpus of hostile layers."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from typing import Iterator

import pytest

from moord.actors import diff
from moord.actors.diff import MODE_NATIVE, MODE_OVERLAY, apply_layer
from moord.linux.mount import mounted
from moord.messages.errors import InvalidArgument


@pytest.fixture
def sandbox() -> Iterator[str]:
    """A temp dir holding `root` (the target) and `outside` (must stay untouched)."""
    base = tempfile.mkdtemp(prefix="md-diff-", dir="/tmp")
    os.mkdir(os.path.join(base, "root"))
    os.mkdir(os.path.join(base, "outside"))
    with open(os.path.join(base, "outside", "secret"), "w") as fh:
        fh.write("secret")
    with open(os.path.join(base, "outside", "victim"), "w") as fh:
        fh.write("victim")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the kernel's openat2 and again with the openat walk used without it."""
    if request.param == "walk":
        def no_openat2(root_fd: int, path: str, flags: int) -> int:
            raise OSError(errno.ENOSYS, "openat2 disabled for this test")

        monkeypatch.setattr(diff, "openat2_in_root", no_openat2)
    return str(request.param)


def outside_untouched(base: str) -> None:
    """The `outside` dir holds exactly its two original files, unchanged."""
    out = os.path.join(base, "outside")
    assert sorted(os.listdir(out)) == ["secret", "victim"]
    for name in ("secret", "victim"):
        st = os.lstat(os.path.join(out, name))
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        with open(os.path.join(out, name)) as fh:
            assert fh.read() == name


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of the given (TarInfo, data) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, mode: int = 0o644, **fields: object) -> tuple[tarfile.TarInfo, bytes | None]:
    """One tar entry."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE and data is None:
        data = b""
    return info, data


def apply_bytes(data: bytes, target: str, **kwargs: object) -> diff.ApplyResult:
    """Apply a layer given as bytes (through a stream, as the images process may)."""
    return apply_layer(io.BytesIO(data), target, **kwargs)  # type: ignore[arg-type]


# -- formats and metadata ------------------------------------------------------------


def sample_tree(base: str) -> str:
    """A tree with every kind of entry and unusual metadata."""
    src = os.path.join(base, "src")
    os.makedirs(os.path.join(src, "dir", "sub"))
    with open(os.path.join(src, "dir", "file"), "wb") as fh:
        fh.write(b"hello\n" * 1000)
    with open(os.path.join(src, "big"), "wb") as fh:
        fh.write(os.urandom(3 * 1024 * 1024 + 17))
    os.link(os.path.join(src, "dir", "file"), os.path.join(src, "hard"))
    os.symlink("dir/file", os.path.join(src, "sym"))
    os.symlink("/nonexistent/abs", os.path.join(src, "dangling"))
    os.mkfifo(os.path.join(src, "fifo"))
    os.mknod(os.path.join(src, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with open(os.path.join(src, "suid"), "wb") as fh:
        fh.write(b"#!/bin/sh\n")
    os.chown(os.path.join(src, "suid"), 1234, 5678)
    os.chmod(os.path.join(src, "suid"), 0o4755)
    os.chown(os.path.join(src, "dir", "sub"), 42, 43)
    os.chmod(os.path.join(src, "dir", "sub"), 0o1770)
    os.setxattr(os.path.join(src, "dir", "file"), "user.moord", b"value")
    os.utime(os.path.join(src, "dir", "sub"), ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    os.utime(os.path.join(src, "dir"), (1_400_000_000, 1_400_000_000))
    return src


def tar_of(src: str) -> bytes:
    """GNU tar's view of a tree (pax format, xattrs included)."""
    import subprocess

    out = subprocess.run(
        ["tar", "--format=pax", "--xattrs", "--xattrs-include=user.*", "--numeric-owner", "-C", src, "-cf", "-", "."],
        check=True, capture_output=True,
    )
    return out.stdout


def snapshot_of(root: str) -> dict[str, tuple]:
    """Every path's type, mode, owner, size, target, mtime (non-dirs) and user xattrs."""
    result: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
            xattrs = {}
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                xattrs = {k: os.getxattr(full, k) for k in os.listxattr(full) if k.startswith("user.")}
            body = b""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    body = hashlib.sha256(fh.read()).digest()
            result[rel] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body, link,
                st.st_rdev, int(st.st_mtime), tuple(sorted(xattrs.items())),
            )
    return result


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_roundtrip_preserves_everything(sandbox: str, compression: str) -> None:
    src = sample_tree(sandbox)
    tar = tar_of(src)
    if compression == "gzip":
        blob = gzip.compress(tar)
    elif compression == "zstd":
        import zstandard

        blob = zstandard.ZstdCompressor().compress(tar)
    else:
        blob = tar
    path = os.path.join(sandbox, "layer")
    with open(path, "wb") as fh:
        fh.write(blob)
    root = os.path.join(sandbox, "root")
    result = apply_layer(path, root, mode=MODE_OVERLAY)
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert result.compressed_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.compression == compression
    assert result.size == len(tar)
    assert snapshot_of(root) == snapshot_of(src)
    # Hard links stay links; sub-second directory mtimes survive (they are set last).
    assert os.stat(os.path.join(root, "hard")).st_ino == os.stat(os.path.join(root, "dir", "file")).st_ino
    assert os.stat(os.path.join(root, "dir", "sub")).st_mtime_ns == 1_500_000_000_123_456_789
    outside_untouched(sandbox)


def test_gnu_long_names_and_multi_member_gzip(sandbox: str) -> None:
    long_dir = "d" * 120
    long_name = f"{long_dir}/" + "f" * 150
    tar = make_tar([entry(long_dir + "/", tarfile.DIRTYPE, mode=0o755), entry(long_name, data=b"x"), entry("l", tarfile.SYMTYPE, linkname="t" * 200)], fmt=tarfile.GNU_FORMAT)
    half = len(tar) // 2
    blob = gzip.compress(tar[:half]) + gzip.compress(tar[half:])  # pigz-style concatenation
    root = os.path.join(sandbox, "root")
    result = apply_bytes(blob, root)
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert os.path.isfile(os.path.join(root, long_name))
    assert os.readlink(os.path.join(root, "l")) == "t" * 200


def test_diff_id_covers_trailing_bytes(sandbox: str) -> None:
    tar = make_tar([entry("a", data=b"1")]) + b"\0" * 10240
    result = apply_bytes(tar, os.path.join(sandbox, "root"))
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_replaces_existing_entries(sandbox: str) -> None:
    root = os.path.join(sandbox, "root")
    os.makedirs(os.path.join(root, "was-dir", "deep"))
    with open(os.path.join(root, "was-file"), "w") as fh:
        fh.write("old")
    os.symlink("/etc", os.path.join(root, "was-link"))
    tar = make_tar([
        entry("was-dir", data=b"now a file"),
        entry("was-file/", tarfile.DIRTYPE, mode=0o700),
        entry("was-file/inner", data=b"in"),
        entry("was-link/", tarfile.DIRTYPE, mode=0o755),
        entry("was-link/x", data=b"x"),
    ])
    apply_bytes(tar, root, mode=MODE_NATIVE)
    with open(os.path.join(root, "was-dir")) as fh:
        assert fh.read() == "now a file"
    assert stat.S_IMODE(os.stat(os.path.join(root, "was-file")).st_mode) == 0o700
    assert not os.path.islink(os.path.join(root, "was-link"))
    assert os.path.isfile(os.path.join(root, "was-link", "x"))
    assert not os.path.exists("/etc/x")


# -- whiteouts -----------------------------------------------------------------------


def whiteout_layer() -> bytes:
    return make_tar([
        entry(".wh.gone"),
        entry("dir/", tarfile.DIRTYPE, mode=0o755),
        entry("dir/.wh..wh..opq"),
        entry("dir/new", data=b"new"),
        entry(".wh..wh.plnk"),  # aufs bookkeeping: ignored
    ])


def test_whiteouts_overlay_mode_make_real_overlay_whiteouts(sandbox: str) -> None:
    lower = os.path.join(sandbox, "lower")
    os.makedirs(os.path.join(lower, "dir"))
    for name in ("gone", "kept", "dir/old"):
        with open(os.path.join(lower, name), "w") as fh:
            fh.write(name)
    upper = os.path.join(sandbox, "root")
    apply_bytes(whiteout_layer(), upper, mode=MODE_OVERLAY, parents=[lower])
    st = os.lstat(os.path.join(upper, "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(os.path.join(upper, "dir"), "trusted.overlay.opaque") == b"y"
    assert not os.path.lexists(os.path.join(upper, ".wh..wh.plnk"))
    work = os.path.join(sandbox, "work")
    os.mkdir(work)
    mount = {"type": "overlay", "source": "overlay", "options": [f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"]}
    with mounted([mount]) as merged:
        assert sorted(os.listdir(merged)) == ["dir", "kept"]
        assert os.listdir(os.path.join(merged, "dir")) == ["new"]


def test_whiteouts_native_mode_remove(sandbox: str) -> None:
    root = os.path.join(sandbox, "root")
    os.makedirs(os.path.join(root, "dir", "olddir"))
    for name in ("gone", "kept", "dir/old", "dir/olddir/x"):
        with open(os.path.join(root, name), "w") as fh:
            fh.write(name)
    apply_bytes(whiteout_layer(), root, mode=MODE_NATIVE)
    assert sorted(os.listdir(root)) == ["dir", "kept"]
    assert os.listdir(os.path.join(root, "dir")) == ["new"]


def test_implied_parent_copies_lower_attributes(sandbox: str) -> None:
    lower = os.path.join(sandbox, "lower")
    os.makedirs(os.path.join(lower, "etc"))
    os.chown(os.path.join(lower, "etc"), 7, 8)
    os.chmod(os.path.join(lower, "etc"), 0o750)
    upper = os.path.join(sandbox, "root")
    apply_bytes(make_tar([entry("etc/conf", data=b"c")]), upper, mode=MODE_OVERLAY, parents=[lower])
    st = os.stat(os.path.join(upper, "etc"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 7, 8)


# -- hostile layers -------------------------------------------------------------------


def test_dotdot_and_absolute_names_stay_inside(sandbox: str, resolver: str) -> None:
    root = os.path.join(sandbox, "root")
    tar = make_tar([
        entry("../escape", data=b"1"),
        entry("../../outside/victim", data=b"pwned"),
        entry("/abs", data=b"2"),
        entry("a/../../../outside/secret", data=b"pwned"),
    ])
    apply_bytes(tar, root)
    assert sorted(os.listdir(root)) == ["abs", "escape", "outside"]
    assert sorted(os.listdir(os.path.join(root, "outside"))) == ["secret", "victim"]
    outside_untouched(sandbox)
    assert not os.path.exists(os.path.join(os.path.dirname(sandbox), "escape"))


@pytest.mark.parametrize("link_target", ["../outside", "/OUTSIDE", "../../../../../../OUTSIDE", "x/../../outside"])
def test_symlink_then_write_stays_inside(sandbox: str, resolver: str, link_target: str) -> None:
    root = os.path.join(sandbox, "root")
    link_target = link_target.replace("OUTSIDE", os.path.join(sandbox, "outside").lstrip("/"))
    tar = make_tar([
        entry("link", tarfile.SYMTYPE, linkname=link_target),
        entry("link/pwned", data=b"pwned"),
        entry("link/victim", data=b"pwned"),
        entry("link/sub/deeper", data=b"pwned"),
    ])
    apply_bytes(tar, root, mode=MODE_NATIVE)
    outside_untouched(sandbox)
    assert os.path.islink(os.path.join(root, "link"))
    # Resolved as if root were "/": the writes land under root.
    found = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert len(found) == 3 and all(p.startswith(root + "/") for p in found)


def test_symlinked_parent_chain_and_loops(sandbox: str, resolver: str) -> None:
    root = os.path.join(sandbox, "root")
    outside = os.path.join(sandbox, "outside")
    tar = make_tar([
        entry("a", tarfile.SYMTYPE, linkname="b"),
        entry("b", tarfile.SYMTYPE, linkname=outside),
        entry("a/pwned", data=b"pwned"),
    ])
    apply_bytes(tar, root)
    outside_untouched(sandbox)
    loop = make_tar([entry("loop", tarfile.SYMTYPE, linkname="loop"), entry("loop/x", data=b"x")])
    with pytest.raises(InvalidArgument):
        apply_bytes(loop, os.path.join(sandbox, "root"))
    outside_untouched(sandbox)


def test_hardlinks_cannot_reach_outside(sandbox: str, resolver: str) -> None:
    root = os.path.join(sandbox, "root")
    outside = os.path.join(sandbox, "outside")
    for linkname in ("../outside/secret", os.path.join(outside, "secret"), "via/secret"):
        tar = make_tar([
            entry("via", tarfile.SYMTYPE, linkname=outside),
            entry("hl", tarfile.LNKTYPE, linkname=linkname, mode=0o4755),
        ])
        with pytest.raises(InvalidArgument):
            apply_bytes(tar, root)
        outside_untouched(sandbox)
    # A hard link inside the root works, and its header cannot make the target setuid.
    ok = make_tar([entry("t", data=b"t", mode=0o755), entry("hl", tarfile.LNKTYPE, linkname="t", mode=0o4755)])
    apply_bytes(ok, root)
    assert os.stat(os.path.join(root, "hl")).st_ino == os.stat(os.path.join(root, "t")).st_ino
    assert stat.S_IMODE(os.stat(os.path.join(root, "t")).st_mode) == 0o755


@pytest.mark.parametrize("mode", [MODE_NATIVE, MODE_OVERLAY])
def test_whiteouts_cannot_escape(sandbox: str, resolver: str, mode: str) -> None:
    root = os.path.join(sandbox, "root")
    outside = os.path.join(sandbox, "outside")
    for name in (".wh..", ".wh...", "a/.wh..", "a/.wh..."):
        with pytest.raises(InvalidArgument):
            apply_bytes(make_tar([entry(name)]), root, mode=mode)
    tar = make_tar([
        entry("../.wh.victim"),
        entry("../outside/.wh.secret"),
        entry("via", tarfile.SYMTYPE, linkname=outside),
        entry("via/.wh.secret"),
        entry("via/.wh..wh..opq"),
        entry("abs", tarfile.SYMTYPE, linkname="/"),
        entry("abs/.wh..wh..opq"),
    ])
    apply_bytes(tar, root, mode=mode)
    outside_untouched(sandbox)


def test_device_nodes_only_inside_or_skipped(sandbox: str, resolver: str) -> None:
    root = os.path.join(sandbox, "root")
    outside = os.path.join(sandbox, "outside")
    tar = make_tar([
        entry("via", tarfile.SYMTYPE, linkname=outside),
        entry("via/disk", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o666),
        entry("../outside/mem", tarfile.CHRTYPE, devmajor=1, devminor=1, mode=0o666),
    ])
    apply_bytes(tar, root)
    outside_untouched(sandbox)
    assert stat.S_ISBLK(os.lstat(os.path.join(root, sandbox.lstrip("/"), "outside", "disk")).st_mode)
    assert stat.S_ISCHR(os.lstat(os.path.join(root, "outside", "mem")).st_mode)
    other = os.path.join(sandbox, "root2")
    os.mkdir(other)
    apply_bytes(tar, other, devices=False)
    assert not [f for _, _, fs in os.walk(other) for f in fs]


def test_overlay_xattrs_from_layers_are_ignored(sandbox: str) -> None:
    root = os.path.join(sandbox, "root")
    info, data = entry("d/", tarfile.DIRTYPE, mode=0o755)
    info.pax_headers = {"SCHILY.xattr.trusted.overlay.redirect": "/etc", "SCHILY.xattr.user.ok": "1"}
    apply_bytes(make_tar([(info, data)]), root, mode=MODE_OVERLAY)
    names = os.listxattr(os.path.join(root, "d"))
    assert "user.ok" in names and not [n for n in names if n.startswith("trusted.overlay.")]


def test_decompression_bomb_and_entry_caps(sandbox: str) -> None:
    root = os.path.join(sandbox, "root")
    bomb = gzip.compress(make_tar([entry("zeros", data=bytes(64 * 1024 * 1024))]))
    assert len(bomb) < 200 * 1024
    with pytest.raises(InvalidArgument, match="uncompressed bytes"):
        apply_bytes(bomb, root, max_bytes=16 * 1024 * 1024)
    import zstandard

    zbomb = zstandard.ZstdCompressor().compress(bytes(256 * 1024 * 1024))
    with pytest.raises(InvalidArgument, match="uncompressed bytes"):
        apply_bytes(zbomb, root, max_bytes=16 * 1024 * 1024)
    many = make_tar([entry(f"f{i}") for i in range(500)])
    with pytest.raises(InvalidArgument, match="entries"):
        apply_bytes(many, root, max_entries=100)
    assert len([n for n in os.listdir(root) if n.startswith("f")]) <= 100
    outside_untouched(sandbox)


def test_malformed_input_is_invalid_argument(sandbox: str) -> None:
    root = os.path.join(sandbox, "root")
    good = make_tar([entry("a", data=b"a" * 1000)])
    corrupt = bytearray(good)
    corrupt[0] ^= 0x01  # name changes, checksum no longer matches
    cases = [
        bytes(corrupt),
        good[:700],  # truncated inside the data
        gzip.compress(good)[:-20],  # truncated gzip
        b"\x1f\x8b" + os.urandom(100),  # gzip magic then garbage
        b"BZh9" + bytes(100),  # bzip2: not a layer compression
        make_tar([entry("s", data=b"", pax_headers={"GNU.sparse.major": "1"})]),
        make_tar([entry("p", data=b"x", pax_headers={"path": "a\x00b"})]),
    ]
    for blob in cases:
        with pytest.raises(InvalidArgument):
            apply_bytes(blob, root)
    file_then_child = make_tar([entry("f", data=b"f"), entry("f/child", data=b"c")])
    with pytest.raises(InvalidArgument):
        apply_bytes(file_then_child, root)


def test_layers_from_mounts() -> None:
    overlay = {"type": "overlay", "source": "overlay", "options": ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"]}
    assert diff.layers_from_mounts([overlay]) == ("/u", ["/l1", "/l2"])
    assert diff.layers_from_mounts([{"type": "bind", "source": "/x", "options": ["rbind"]}]) is None
    assert diff.layers_from_mounts([{"type": "overlay", "source": "overlay", "options": ["lowerdir=/a:/b"]}]) is None
