"""OCI image layouts: write one from a root filesystem, read one (directory or tar) safely.

Writing is deterministic: a layer tar with sorted entries, numeric ids, an optional
fixed mtime and a gzip header without name or time, then config, manifest and index as
canonical JSON. The same rootfs gives the same digests on every run.

Reading trusts nothing: tar members are only looked up, never extracted, and a member
whose name leaves the layout is refused; blobs are found by validated digest only,
opened without following symlinks, and hashed while read; index and manifest
documents are capped at 4 MiB.

Imports only the standard library (and moord's stdlib-only errors): moorctl uses it.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Sequence

from moord.messages.errors import AlreadyExists, InvalidArgument, NotFound
from moord.oci import image as oci

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
INDEX_FILE = "index.json"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
EPOCH = "1970-01-01T00:00:00Z"
_DIGEST_RE = re.compile(r"^sha256:([a-f0-9]{64})$")
_COPY_CHUNK = 1024 * 1024


def canonical_json(doc: Any) -> bytes:
    """JSON with sorted keys and no spaces: stable bytes, hence stable digests."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_hex(digest: str) -> str:
    """The hex part of a `sha256:<hex>` digest; InvalidArgument for anything else."""
    match = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if not match:
        raise InvalidArgument(f"invalid digest {str(digest)[:100]!r}: want sha256:<64 lowercase hex>")
    return match.group(1)


# -- writing -----------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `inner`."""

    def __init__(self, inner: BinaryIO | None) -> None:
        super().__init__()
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        self.hash.update(data)
        self.size += len(data)
        if self.inner is not None:
            self.inner.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        """`sha256:<hex>` of everything written."""
        return "sha256:" + self.hash.hexdigest()


@dataclass
class LayerBlob:
    """A layer written into a layout: its descriptor fields and its uncompressed digest."""

    digest: str
    size: int
    diff_id: str
    media_type: str = oci.MEDIA_TYPE_OCI_LAYER_GZIP


@dataclass
class LayoutResult:
    """What write_layout wrote: the manifest's descriptor and the digests around it."""

    path: str
    ref: str
    manifest: dict[str, Any]
    config_digest: str
    layers: list[LayerBlob] = field(default_factory=list)

    @property
    def manifest_digest(self) -> str:
        """Digest of the image manifest (the image record's target)."""
        return str(self.manifest["digest"])


def _tarinfo(root: str, rel: str, st: os.stat_result, mtime: int | None, owner: tuple[int, int] | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = owner if owner is not None else (st.st_uid, st.st_gid)
    info.uname = info.gname = ""  # numeric ids only: names depend on the building host
    info.mtime = int(st.st_mtime) if mtime is None else mtime
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(os.path.join(root, rel))
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        raise InvalidArgument(f"{rel}: sockets and other special files cannot go into a layer")
    return info


def _sorted_tree_under(root: str, rel: str) -> Iterator[str]:
    """Paths below `root`/`rel`, relative to root: depth first, names in byte order.

    Each directory comes right before its contents, as tar readers expect; symlinks to
    directories are entries, never descended.
    """
    with os.scandir(os.path.join(root, rel)) as it:
        names = sorted((e.name for e in it), key=os.fsencode)
    for name in names:
        child = posixpath.join(rel, name)
        yield child
        full = os.path.join(root, child)
        if os.path.isdir(full) and not os.path.islink(full):
            yield from _sorted_tree_under(root, child)


def write_layer_tar(rootfs: str, out: BinaryIO, mtime: int | None = 0, owner: tuple[int, int] | None = None) -> None:
    """Write `rootfs` as a deterministic tar: sorted entries, numeric ids, hardlinks kept.

    `mtime` None keeps each file's mtime; `owner` (uid, gid) overrides every entry's owner.
    """
    seen_inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel in _sorted_tree_under(rootfs, ""):
            full = os.path.join(rootfs, rel)
            st = os.lstat(full)
            info = _tarinfo(rootfs, rel, st, mtime, owner)
            if info.type == tarfile.REGTYPE and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen_inodes:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, seen_inodes[key], 0
                else:
                    seen_inodes[key] = rel
            if info.type == tarfile.REGTYPE:
                with open(full, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)


def _store_blob(layout: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    target = os.path.join(layout, "blobs", "sha256", digest_hex(digest))
    if not os.path.exists(target):
        tmp = target + ".tmp"
        _write_file(tmp, data)
        os.replace(tmp, target)
    return digest


def _write_file(path: str, data: bytes) -> None:
    """Write a file with mode 0644 whatever the umask (layout tars must not depend on it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o644)


def write_layer_blob(layout: str, rootfs: str, mtime: int | None = 0, owner: tuple[int, int] | None = None, compresslevel: int = 6) -> LayerBlob:
    """Write `rootfs` as a tar+gzip layer blob into `layout`; returns its digests."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".layer-", dir=blobs)
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = _HashingWriter(raw)  # type: ignore[arg-type]
            # filename="" and mtime=0: the gzip header carries neither, so output is stable.
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=compresslevel, mtime=0) as gz:  # type: ignore[arg-type]
                uncompressed = _HashingWriter(gz)  # type: ignore[arg-type]
                write_layer_tar(rootfs, uncompressed, mtime, owner)  # type: ignore[arg-type]
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the layout unreadable to others
        os.replace(tmp, os.path.join(blobs, digest_hex(compressed.digest)))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return LayerBlob(compressed.digest, compressed.size, uncompressed.digest)


def write_layout(
    rootfs: str,
    path: str,
    ref: str,
    *,
    cmd: Sequence[str] = ("sh",),
    env: Sequence[str] = DEFAULT_ENV,
    entrypoint: Sequence[str] = (),
    working_dir: str = "",
    user: str = "",
    mtime: int | None = 0,
    owner: tuple[int, int] | None = None,
    platform: dict[str, str] | None = None,
    tar: bool = False,
) -> LayoutResult:
    """Write an OCI image layout of one single-layer image built from `rootfs`.

    `path` is the layout directory (an existing layout gains or replaces the entry for
    `ref`), or with `tar` the tar file to write. `mtime` fixes every entry's mtime
    (None keeps them); `owner` (uid, gid) overrides ownership.
    """
    if not os.path.isdir(rootfs):
        raise NotFound(f"rootfs {rootfs}: not a directory")
    if tar:
        staging = tempfile.mkdtemp(prefix=".layout-", dir=os.path.dirname(os.path.abspath(path)))
        try:
            result = write_layout(
                rootfs, staging, ref, cmd=cmd, env=env, entrypoint=entrypoint, working_dir=working_dir,
                user=user, mtime=mtime, owner=owner, platform=platform,
            )
            tmp = path + ".tmp"
            with open(tmp, "wb") as out:
                write_layer_tar(staging, out, mtime=0, owner=(0, 0))
            os.replace(tmp, path)
            result.path = path
            return result
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    for sub in (path, os.path.join(path, "blobs"), os.path.join(path, "blobs", "sha256")):
        os.chmod(sub, 0o755)
    layer = write_layer_blob(path, rootfs, mtime=mtime, owner=owner)
    plat = dict(platform or oci.host_platform())
    container_config: dict[str, Any] = {"Env": list(env)}
    if cmd:
        container_config["Cmd"] = list(cmd)
    if entrypoint:
        container_config["Entrypoint"] = list(entrypoint)
    if working_dir:
        container_config["WorkingDir"] = working_dir
    if user:
        container_config["User"] = user
    config = {
        "architecture": plat["architecture"],
        "os": plat["os"],
        **({"variant": plat["variant"]} if plat.get("variant") else {}),
        "created": EPOCH,
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created": EPOCH, "created_by": "moord oci layout writer"}],
    }
    config_bytes = canonical_json(config)
    config_digest = _store_blob(path, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": oci.MEDIA_TYPE_OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
    }
    manifest_bytes = canonical_json(manifest)
    manifest_digest = _store_blob(path, manifest_bytes)
    descriptor = {
        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
        "digest": manifest_digest,
        "size": len(manifest_bytes),
        "platform": plat,
        "annotations": {oci.REF_NAME_ANNOTATION: ref, CONTAINERD_NAME_ANNOTATION: ref},
    }
    index_path = os.path.join(path, INDEX_FILE)
    manifests: list[dict[str, Any]] = []
    if os.path.exists(index_path):
        with open(index_path, "rb") as fh:
            existing = oci.load_document(fh.read(oci.MAX_MANIFEST_BYTES + 1), "index.json")
        manifests = [
            m for m in existing.get("manifests", [])
            if isinstance(m, dict) and (m.get("annotations") or {}).get(oci.REF_NAME_ANNOTATION) != ref
        ]
    manifests.append(descriptor)
    index = {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX, "manifests": manifests}
    for name, data in ((LAYOUT_FILE, canonical_json({"imageLayoutVersion": LAYOUT_VERSION})), (INDEX_FILE, canonical_json(index))):
        _write_file(os.path.join(path, name) + ".tmp", data)
        os.replace(os.path.join(path, name) + ".tmp", os.path.join(path, name))
    return LayoutResult(path, ref, descriptor, config_digest, [layer])


# -- reading -----------------------------------------------------------------------


class VerifiedReader(io.RawIOBase):
    """Reads a blob of known digest and size; raises InvalidArgument when the bytes differ.

    The check happens as the last byte is read (and at close when the blob was short).
    """

    def __init__(self, raw: BinaryIO, digest: str, size: int, name: str) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._size = size
        self._name = name
        self._hash = hashlib.sha256()
        self._read = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._read)
        if want <= 0:
            self._check()
            return 0
        n = self._raw.readinto(view[:want])  # type: ignore[attr-defined]
        if not n:
            self._check()
            return 0
        self._hash.update(view[:n])
        self._read += n
        if self._read == self._size:
            self._check()
        return n

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._read != self._size:
            raise InvalidArgument(f"{self._name}: blob {self._digest} has {self._read} bytes, its descriptor says {self._size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise InvalidArgument(f"{self._name}: blob {self._digest} has digest {actual}")

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class _TarSlice(io.RawIOBase):
    """One member's bytes inside a tar file, read with pread (no shared file position)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._offset + self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass
class LayoutImage:
    """An image named by a layout's index.json: its name and target descriptor (OCI JSON)."""

    name: str
    target: dict[str, Any]


# A tar listing more members than this is refused before its index eats the memory.
MAX_TAR_MEMBERS = 1_000_000
# Symlinks (and hard links) between tar members are followed at most this deep.
MAX_LINK_DEPTH = 8


def _member_name(name: str) -> str:
    """A tar member's name inside the archive; InvalidArgument when it would leave it."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise InvalidArgument(f"tar member {name[:200]!r} leaves the layout")
    return "/".join(parts)


def _link_target(member: str, linkname: str, hard: bool) -> str:
    """Where a tar link points, as a member name; InvalidArgument when it leaves the archive.

    A symlink's target is relative to its directory, a hard link's to the archive root.
    """
    if linkname.startswith("/"):
        raise InvalidArgument(f"tar member {member[:200]!r} links outside the archive ({linkname[:200]!r})")
    base = "" if hard else posixpath.dirname(member)
    joined = posixpath.normpath(posixpath.join(base, linkname)) if linkname else ""
    if not joined or joined == "." or joined == ".." or joined.startswith("../"):
        raise InvalidArgument(f"tar member {member[:200]!r} links outside the archive ({linkname[:200]!r})")
    return joined


class ArchiveFiles:
    """Read-only access to the files of an image archive: a directory or an uncompressed tar.

    Directories: every path component is opened with O_NOFOLLOW below one directory fd,
    so a symlink anywhere is refused. Tars: indexed once (names only, nothing is
    extracted); a member leaving the root, a link pointing out of it, or a member
    extending past the end of the file is refused up front; links between members are
    followed inside the archive.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._dir_fd = -1
        self._tar_fd = -1
        self._members: dict[str, tuple[int, int]] = {}  # name -> (data offset, size)
        self._links: dict[str, str] = {}  # name -> member it points at
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file or directory") from None
        except OSError as exc:
            raise InvalidArgument(f"{path}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        elif stat.S_ISREG(st.st_mode):
            self._open_tar(st.st_size)
        else:
            raise InvalidArgument(f"{path}: neither a directory nor a tar file")

    @property
    def is_tar(self) -> bool:
        """Whether the archive is a tar file (else a directory)."""
        return self._tar_fd >= 0

    def _open_tar(self, file_size: int) -> None:
        self._tar_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with os.fdopen(os.dup(self._tar_fd), "rb") as fh:
                head = fh.read(6)
                fh.seek(0)
                if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd":
                    raise InvalidArgument(f"{self.path}: compressed archives are not supported; decompress it first")
                try:
                    with tarfile.open(fileobj=fh, mode="r:") as tar:
                        for count, member in enumerate(tar):
                            if count >= MAX_TAR_MEMBERS:
                                raise InvalidArgument(f"{self.path}: more than {MAX_TAR_MEMBERS} tar members")
                            self._index_member(member, file_size)
                except tarfile.TarError as exc:
                    raise InvalidArgument(f"{self.path}: not a valid tar: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _index_member(self, member: tarfile.TarInfo, file_size: int) -> None:
        name = _member_name(member.name)
        if member.isreg():
            if member.offset_data + member.size > file_size:
                raise InvalidArgument(
                    f"{self.path}: tar member {name[:200]!r} claims {member.size} bytes, past the end of the file"
                )
            self._members[name] = (member.offset_data, member.size)
            self._links.pop(name, None)
        elif member.issym() or member.islnk():
            self._links[name] = _link_target(name, member.linkname, member.islnk())
            self._members.pop(name, None)

    def close(self) -> None:
        """Release the archive's file descriptors."""
        for attr in ("_dir_fd", "_tar_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> "ArchiveFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exists(self, rel: str) -> bool:
        """Whether the archive holds a regular file at `rel` (links inside a tar followed)."""
        try:
            stream, _ = self.open(rel)
        except NotFound:
            return False
        stream.close()
        return True

    def resolve(self, rel: str) -> str:
        """The member a tar name stands for, after following links inside the archive."""
        name = _member_name(rel)
        for _ in range(MAX_LINK_DEPTH):
            target = self._links.get(name)
            if target is None:
                return name
            name = target
        raise InvalidArgument(f"{self.path}: {rel[:200]!r}: too many levels of links")

    def open(self, rel: str) -> tuple[BinaryIO, int]:
        """Open a file of the archive by relative path: (stream, size)."""
        if self._tar_fd >= 0:
            found = self._members.get(self.resolve(rel))
            if found is None:
                raise NotFound(f"{self.path}: no {rel}")
            offset, size = found
            return io.BufferedReader(_TarSlice(self._tar_fd, offset, size), _COPY_CHUNK), size  # type: ignore[return-value]
        rel = _member_name(rel)
        fd = self._dir_fd
        opened: list[int] = []
        try:
            parts = rel.split("/")
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
                try:
                    fd = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    raise NotFound(f"{self.path}: no {rel}") from None
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise InvalidArgument(f"{self.path}: {rel} is (or passes through) a symlink") from None
                    raise
                opened.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{self.path}: {rel} is not a regular file")
            stream = os.fdopen(opened.pop(), "rb", buffering=_COPY_CHUNK)
            return stream, st.st_size
        finally:
            for extra in opened:
                os.close(extra)

    def read_small(self, rel: str, limit: int = oci.MAX_MANIFEST_BYTES) -> bytes:
        """A whole file of at most `limit` bytes; InvalidArgument when larger."""
        stream, size = self.open(rel)
        with stream:
            if size > limit:
                raise InvalidArgument(f"{self.path}: {rel} has {size} bytes, more than the {limit}-byte limit")
            return stream.read(limit + 1)


class OciLayout(ArchiveFiles):
    """A readable OCI image layout, from a directory or an (uncompressed) tar of one."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            layout = json.loads(self.read_small(LAYOUT_FILE))
        except NotFound:
            self.close()
            raise InvalidArgument(f"{path}: not an OCI image layout (no {LAYOUT_FILE})") from None
        except ValueError:
            self.close()
            raise InvalidArgument(f"{path}: {LAYOUT_FILE} is not valid JSON") from None
        except BaseException:
            self.close()
            raise
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if version != LAYOUT_VERSION:
            self.close()
            raise InvalidArgument(f"{path}: unsupported image layout version {version!r}")

    def __enter__(self) -> "OciLayout":
        return self

    # -- blobs ---------------------------------------------------------------------

    def blob_size(self, digest: str) -> int:
        """Size of a blob in the layout; NotFound when absent."""
        stream, size = self.open(f"blobs/sha256/{digest_hex(digest)}")
        stream.close()
        return size

    def has_blob(self, digest: str) -> bool:
        """Whether the layout holds the blob."""
        try:
            self.blob_size(digest)
        except NotFound:
            return False
        return True

    def open_blob(self, digest: str, size: int | None = None) -> VerifiedReader:
        """A reader of the blob that checks its digest (and `size`, when given) as it is read."""
        stream, actual = self.open(f"blobs/sha256/{digest_hex(digest)}")
        if size is not None and size != actual:
            stream.close()
            raise InvalidArgument(f"{self.path}: blob {digest} has {actual} bytes, its descriptor says {size}")
        return VerifiedReader(stream, digest, actual, self.path)

    def read_document(self, digest: str, size: int | None = None, what: str = "document") -> tuple[bytes, dict[str, Any]]:
        """A verified index, manifest or config blob (at most 4 MiB): (bytes, parsed JSON)."""
        stream, actual = self.open(f"blobs/sha256/{digest_hex(digest)}")
        stream.close()
        if actual > oci.MAX_MANIFEST_BYTES:
            raise InvalidArgument(f"{self.path}: {what} {digest} has {actual} bytes, more than the {oci.MAX_MANIFEST_BYTES}-byte limit")
        with self.open_blob(digest, size) as reader:
            data = reader.readall()  # reads to EOF, where the digest is checked
        try:
            return data, oci.load_document(data, f"{what} {digest}")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    def index(self) -> dict[str, Any]:
        """The layout's index.json."""
        data = self.read_small(INDEX_FILE)
        try:
            doc = oci.load_document(data, f"{self.path}: {INDEX_FILE}")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not isinstance(doc.get("manifests", []), list):
            raise InvalidArgument(f"{self.path}: {INDEX_FILE}: manifests is not a list")
        return doc

    def index_bytes(self) -> bytes:
        """index.json as stored (the layout's root index blob)."""
        return self.read_small(INDEX_FILE)

    def images(self, base_name: str = "") -> Iterator[LayoutImage]:
        """Images named in index.json, as containerd's import names them.

        `io.containerd.image.name` wins; else `org.opencontainers.image.ref.name` when it
        is a full reference, or `<base_name>:<ref>` for a bare tag; unnamed entries are skipped.
        """
        for entry in self.index().get("manifests", []):
            target = validate_descriptor(entry, f"{self.path}: {INDEX_FILE}")
            annotations = target.get("annotations") or {}
            name = annotations.get(CONTAINERD_NAME_ANNOTATION, "")
            if not name:
                ref = annotations.get(oci.REF_NAME_ANNOTATION, "")
                if any(c in ref for c in "/:@"):
                    name = ref
                elif ref and base_name:
                    name = f"{base_name}:{ref}"
            if name:
                yield LayoutImage(name, target)


def validate_descriptor(entry: Any, where: str) -> dict[str, Any]:
    """Check an OCI descriptor's shape (mediaType, digest, size); returns it."""
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where}: descriptor is not an object")
    digest_hex(entry.get("digest", ""))
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{where}: descriptor {entry.get('digest')} has an invalid size")
    if not isinstance(entry.get("mediaType", ""), str):
        raise InvalidArgument(f"{where}: descriptor {entry.get('digest')} has an invalid mediaType")
    annotations = entry.get("annotations")
    if annotations is not None and not (
        isinstance(annotations, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items())
    ):
        raise InvalidArgument(f"{where}: descriptor {entry.get('digest')} has invalid annotations")
    return entry


def children(doc: dict[str, Any], media_type: str, where: str) -> list[dict[str, Any]]:
    """The descriptors an index or manifest refers to (config first, then layers)."""
    if media_type in oci.INDEX_TYPES or (not media_type and "manifests" in doc):
        entries = doc.get("manifests", [])
    elif media_type in oci.MANIFEST_TYPES or (not media_type and "layers" in doc):
        entries = ([doc["config"]] if "config" in doc else []) + list(doc.get("layers", []))
    else:
        return []
    if not isinstance(entries, list):
        raise InvalidArgument(f"{where}: references are not a list")
    return [validate_descriptor(e, where) for e in entries]


# -- writing archives (export) ------------------------------------------------------


@dataclass
class Record:
    """One file of an archive being written: its name, size, mode and how to get its bytes."""

    name: str
    size: int
    open: Any  # () -> binary stream of exactly `size` bytes (checked as it is copied)
    mode: int = 0o444


def bytes_record(name: str, data: bytes, mode: int = 0o644) -> Record:
    """A record of bytes held in memory."""
    return Record(name, len(data), lambda: io.BytesIO(data), mode)


class ArchiveWriter:
    """Writes an archive (a tar, or a directory tree) so that nothing half-written is left.

    A tar is written to a temporary file beside `path` and renamed over it at `commit`; a
    new directory is built beside `path` and renamed into place. With `merge`, an
    existing directory is written into (blobs by rename, so readers never see half a
    file). An existing `path` is refused unless `overwrite`.
    """

    def __init__(self, path: str, directory: bool, overwrite: bool = False) -> None:
        if not os.path.isabs(path):
            raise InvalidArgument(f"output path must be absolute, got {path[:200]!r}")
        parent = os.path.dirname(path.rstrip("/")) or "/"
        if not os.path.isdir(parent):
            raise NotFound(f"{parent}: no such directory")
        self.path = path.rstrip("/") or "/"
        self.directory = directory
        self.merge = False
        exists = os.path.lexists(self.path)
        if exists and os.path.islink(self.path):
            raise InvalidArgument(f"{self.path} is a symlink; refusing to write through it")
        if directory:
            if exists and not os.path.isdir(self.path):
                raise AlreadyExists(f"{self.path} exists and is not a directory")
            if exists and os.listdir(self.path):
                if not overwrite:
                    raise AlreadyExists(f"{self.path} exists and is not empty (overwrite to add to it)")
                if not os.path.exists(os.path.join(self.path, LAYOUT_FILE)):
                    raise InvalidArgument(f"{self.path} is not an OCI image layout; refusing to write into it")
                self.merge = True
            self._work = self.path if self.merge else tempfile.mkdtemp(prefix=".export-", dir=parent)
            self._tar: tarfile.TarFile | None = None
        else:
            if exists and not overwrite:
                raise AlreadyExists(f"{self.path} exists (overwrite to replace it)")
            if exists and not os.path.isfile(self.path):
                raise InvalidArgument(f"{self.path} exists and is not a regular file")
            fd, self._work = tempfile.mkstemp(prefix=".export-", suffix=".tar", dir=parent)
            self._file = os.fdopen(fd, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)
        self._written: set[str] = set()

    def existing_index(self) -> dict[str, Any] | None:
        """index.json of the layout being merged into, or None."""
        if not self.merge:
            return None
        with OciLayout(self.path) as layout:
            return layout.index()

    def write(self, records: Sequence[Record]) -> None:
        """Write records sorted by name (the first of duplicate names wins), directories first."""
        unique: dict[str, Record] = {}
        for record in records:
            unique.setdefault(record.name, record)
        dirs = sorted({posixpath.dirname(n) for n in unique if "/" in n})
        for d in dirs:
            self._mkdir(d)
        for name in sorted(unique):
            self._file_record(unique[name])

    def _mkdir(self, rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self._written:
                continue
            self._written.add(sub)
            if self._tar is not None:
                info = tarfile.TarInfo(sub + "/")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                self._tar.addfile(info)
            else:
                full = os.path.join(self._work, sub)
                if not os.path.isdir(full):
                    os.mkdir(full, 0o755)

    def _file_record(self, record: Record) -> None:
        name = _member_name(record.name)
        if name in self._written:
            return
        self._written.add(name)
        if self._tar is not None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = record.size, record.mode, 0
            with record.open() as stream:
                try:
                    self._tar.addfile(info, stream)
                except OSError as exc:
                    if exc.errno is not None:
                        raise
                    raise InvalidArgument(f"{name}: fewer than the {record.size} bytes expected") from None
                if stream.read(1):
                    raise InvalidArgument(f"{name}: more than the {record.size} bytes expected")
            return
        target = os.path.join(self._work, name)
        if self.merge and name.startswith("blobs/") and os.path.isfile(target) and os.path.getsize(target) == record.size:
            return  # the layout has this blob already
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=os.path.dirname(target))
        try:
            with os.fdopen(fd, "wb") as out, record.open() as stream:
                copied = 0
                while True:
                    chunk = stream.read(_COPY_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    copied += len(chunk)
                if copied != record.size:
                    raise InvalidArgument(f"{name}: {copied} bytes, {record.size} expected")
            os.chmod(tmp, record.mode)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def commit(self) -> None:
        """Make the archive appear at its path, durably."""
        if self._tar is not None:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._work, 0o644)
            os.replace(self._work, self.path)
        elif not self.merge:
            if os.path.isdir(self.path):
                os.rmdir(self.path)  # empty (checked at start)
            os.chmod(self._work, 0o755)
            os.replace(self._work, self.path)
        fd = os.open(os.path.dirname(self.path) or "/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Remove what was written (never anything that was there before)."""
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:  # the tar is being thrown away; its trailer does not matter
                pass
            self._file.close()
            if os.path.exists(self._work):
                os.unlink(self._work)
        elif not self.merge:
            shutil.rmtree(self._work, ignore_errors=True)
