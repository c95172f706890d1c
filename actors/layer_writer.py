"""The layer writer: the changes from one directory tree to another as an OCI layer tar.

Both trees are walked together, one directory at a time, names in byte order. A name
only on the left becomes a whiteout `.wh.<name>`; a name only on the right is added
with everything below it; a name on both sides is written when its type, mode, owner,
size, mtime, device, link text or xattrs differ (and, when the mtime has no sub-second
part and so may have been truncated, when the bytes differ). A changed entry's
unchanged parent directories are written before it, so the layer carries their
attributes. Regular files, directories, symlinks, hard links (by inode, within the
right tree), devices and fifos are written; sockets are skipped, as containerd does.
Mtimes are truncated to seconds; xattrs travel as SCHILY.xattr pax records.

Everything is opened relative to a directory fd with O_NOFOLLOW, so a tree that
changes while it is walked can never make the walk leave its root. The SHA-256 of the
tar (the diff ID) is computed as it is written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import Callable

from moord.actors.diff import WHITEOUT_PREFIX, xattr_allowed  # the applier's own rule: one rule for both ways
from moord.messages.errors import FailedPrecondition, Internal, InvalidArgument

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_READ_CHUNK = 1024 * 1024
_BLOCK = 512
# Each level holds two directory fds open; deeper trees are refused rather than
# running the process out of descriptors.
MAX_DEPTH = 256

Sink = Callable[[bytes], None]


@dataclass
class LayerStats:
    """What writing a layer produced: the diff ID and size of the uncompressed tar."""

    diff_id: str
    size: int
    entries: int


@dataclass
class _Entry:
    """One name in one directory, with what the comparison needs."""

    name: str
    st: os.stat_result
    xattrs: dict[str, bytes]
    link: str = ""


@dataclass
class _Parent:
    """A directory on the path to the current one: written at most once, when first needed."""

    rel: str
    entry: _Entry | None  # None for the root, which a layer never carries
    written: bool = False


class _TarOut:
    """A tar stream: headers and data to the sink, hashed and counted."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0
        self.entries = 0

    def write(self, data: bytes) -> None:
        """Raw bytes of the archive."""
        if data:
            self.hash.update(data)
            self.size += len(data)
            self._sink(data)

    def header(self, info: tarfile.TarInfo) -> None:
        """One entry's header (pax records first when needed)."""
        self.entries += 1
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def finish(self) -> None:
        """The end-of-archive marker: two zero blocks."""
        self.write(bytes(2 * _BLOCK))


def _xattrs(dir_fd: int, name: str) -> dict[str, bytes]:
    """The entry's xattrs a layer may carry (read without following a symlink)."""
    path = f"/proc/self/fd/{dir_fd}/{name}"
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    found: dict[str, bytes] = {}
    for key in sorted(keys):
        if not xattr_allowed(key):
            continue
        try:
            found[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
    return found


def _entries(dir_fd: int) -> dict[str, _Entry]:
    """The names in a directory with their lstat, xattrs and link text; sockets left out."""
    found: dict[str, _Entry] = {}
    with os.scandir(dir_fd) as listing:
        for item in listing:
            st = item.stat(follow_symlinks=False)
            if stat.S_ISSOCK(st.st_mode):
                continue
            link = os.readlink(item.name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else ""
            found[item.name] = _Entry(item.name, st, _xattrs(dir_fd, item.name), link)
    return found


def _same_bytes(left_fd: int, right_fd: int, name: str) -> bool:
    a = os.open(name, _FILE_FLAGS, dir_fd=left_fd)
    try:
        b = os.open(name, _FILE_FLAGS, dir_fd=right_fd)
        try:
            while True:
                x, y = os.read(a, _READ_CHUNK), os.read(b, _READ_CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
        finally:
            os.close(b)
    finally:
        os.close(a)


def _same(left: _Entry, right: _Entry, left_fd: int, right_fd: int) -> bool:
    """Whether `right` is `left` unchanged (continuity's rule: metadata, then bytes if unsure)."""
    a, b = left.st, right.st
    if (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) != (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns):
        return False
    if left.xattrs != right.xattrs or left.link != right.link:
        return False
    if stat.S_ISDIR(a.st_mode):
        return True
    if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
        return a.st_rdev == b.st_rdev
    if stat.S_ISREG(a.st_mode):
        if a.st_size != b.st_size:
            return False
        if a.st_mtime_ns % 1_000_000_000 == 0 and a.st_size:
            # A whole-second mtime may be a truncated one (copied from a tar): compare bytes.
            return _same_bytes(left_fd, right_fd, left.name)
    return True


class _Writer:
    """The walk over both trees and the tar it writes."""

    def __init__(self, out: _TarOut) -> None:
        self.out = out
        # (st_dev, st_ino) of a hard-linked inode -> the name it was first written as
        self.link_sources: dict[tuple[int, int], str] = {}
        # unchanged names of a hard-linked inode not written yet: linked once it is
        self.link_waiting: dict[tuple[int, int], list[tuple[str, list[_Parent]]]] = {}

    # -- headers ---------------------------------------------------------------------

    def _info(self, rel: str, entry: _Entry) -> tarfile.TarInfo:
        st = entry.st
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = st.st_mtime_ns // 1_000_000_000  # whole seconds, as containerd writes them
        info.uname = info.gname = ""
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            info.type, info.size = tarfile.REGTYPE, st.st_size
        elif kind == stat.S_IFDIR:
            info.type = tarfile.DIRTYPE
        elif kind == stat.S_IFLNK:
            info.type, info.linkname = tarfile.SYMTYPE, entry.link
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            info.type = tarfile.CHRTYPE if kind == stat.S_IFCHR else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif kind == stat.S_IFIFO:
            info.type = tarfile.FIFOTYPE
        else:
            raise Internal(f"{rel}: unexpected file type {kind:o}")
        if entry.xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in entry.xattrs.items()}
        return info

    def _parents(self, chain: list[_Parent]) -> None:
        for parent in chain:
            if not parent.written:
                parent.written = True
                if parent.entry is not None:
                    self.out.header(self._info(parent.rel, parent.entry))

    def _whiteout(self, rel: str, chain: list[_Parent]) -> None:
        self._parents(chain)
        head, _, base = rel.rpartition("/")
        info = tarfile.TarInfo(f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base)
        info.mode, info.mtime = 0, 0  # a fixed time: the same change gives the same layer
        self.out.header(info)

    def _hardlink(self, rel: str, source: str, entry: _Entry, chain: list[_Parent]) -> None:
        self._parents(chain)
        info = self._info(rel, entry)
        info.type, info.linkname, info.size = tarfile.LNKTYPE, source, 0
        info.pax_headers = {}
        self.out.header(info)

    def _emit(self, rel: str, entry: _Entry, dir_fd: int, chain: list[_Parent]) -> None:
        """Write one non-directory entry (as a hard link when its inode was written already)."""
        st = entry.st
        key = (st.st_dev, st.st_ino)
        linked = st.st_nlink > 1
        if linked and key in self.link_sources:
            self._hardlink(rel, self.link_sources[key], entry, chain)
            return
        self._parents(chain)
        info = self._info(rel, entry)
        if not stat.S_ISREG(st.st_mode):
            self.out.header(info)
        else:
            self._file(rel, info, entry, dir_fd)
        if linked:
            self.link_sources[key] = rel
            for other, other_chain in self.link_waiting.pop(key, []):
                self._hardlink(other, rel, entry, other_chain)

    def _file(self, rel: str, info: tarfile.TarInfo, entry: _Entry, dir_fd: int) -> None:
        fd = os.open(entry.name, _FILE_FLAGS, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FailedPrecondition(f"{rel}: changed while the layer was written")
            self.out.header(info)
            left = info.size
            while left:
                data = os.read(fd, min(_READ_CHUNK, left))
                if not data:
                    raise FailedPrecondition(f"{rel}: shrank while the layer was written")
                self.out.write(data)
                left -= len(data)
        finally:
            os.close(fd)
        pad = -info.size % _BLOCK
        if pad:
            self.out.write(bytes(pad))

    # -- the walk --------------------------------------------------------------------

    def compare(self, left_fd: int | None, right_fd: int, chain: list[_Parent], depth: int) -> None:
        """Write the changes in one directory (left_fd None: everything here is new)."""
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"{chain[-1].rel}: tree deeper than {MAX_DEPTH} levels")
        left = _entries(left_fd) if left_fd is not None else {}
        right = _entries(right_fd)
        here = chain[-1].rel
        for name in sorted(left.keys() | right.keys(), key=os.fsencode):
            rel = f"{here}/{name}" if here else name
            old, new = left.get(name), right.get(name)
            if new is None:
                self._whiteout(rel, chain)
                continue
            if name.startswith(WHITEOUT_PREFIX):
                raise InvalidArgument(f"{rel}: a file named {WHITEOUT_PREFIX}* cannot be carried in a layer")
            is_dir = stat.S_ISDIR(new.st.st_mode)
            both_dirs = old is not None and is_dir and stat.S_ISDIR(old.st.st_mode)
            unchanged = old is not None and (stat.S_IFMT(old.st.st_mode) == stat.S_IFMT(new.st.st_mode)) and _same(
                old, new, left_fd, right_fd  # type: ignore[arg-type]
            )
            if not is_dir:
                if not unchanged:
                    self._emit(rel, new, right_fd, chain)
                elif new.st.st_nlink > 1:
                    self._unchanged_link(rel, new, chain)
                continue
            parent = _Parent(rel, new)
            if not unchanged:
                self._parents(chain)
                self.out.header(self._info(rel, new))
                parent.written = True
            # A directory replacing a non-directory is new as a whole: nothing on the left below it.
            self._descend(left_fd if both_dirs else None, right_fd, name, [*chain, parent], depth)

    def _unchanged_link(self, rel: str, entry: _Entry, chain: list[_Parent]) -> None:
        """An unchanged name of a hard-linked inode: linked if the inode is (or will be) written."""
        key = (entry.st.st_dev, entry.st.st_ino)
        if key in self.link_sources:
            self._hardlink(rel, self.link_sources[key], entry, chain)
        else:
            self.link_waiting.setdefault(key, []).append((rel, list(chain)))

    def _descend(self, left_fd: int | None, right_fd: int, name: str, chain: list[_Parent], depth: int) -> None:
        sub_right = os.open(name, _DIR_FLAGS, dir_fd=right_fd)
        try:
            sub_left = os.open(name, _DIR_FLAGS, dir_fd=left_fd) if left_fd is not None else None
            try:
                self.compare(sub_left, sub_right, chain, depth + 1)
            finally:
                if sub_left is not None:
                    os.close(sub_left)
        finally:
            os.close(sub_right)


def write_layer(left: str | None, right: str, sink: Sink) -> LayerStats:
    """Write the layer that turns directory `left` (None: an empty tree) into `right`.

    The tar goes to `sink` in pieces; the returned diff ID is its SHA-256.
    """
    out = _TarOut(sink)
    writer = _Writer(out)
    right_fd = os.open(right, _DIR_FLAGS)
    try:
        left_fd = os.open(left, _DIR_FLAGS) if left is not None else None
        try:
            writer.compare(left_fd, right_fd, [_Parent("", None, written=True)], 0)
        except OSError as exc:
            raise Internal(f"writing layer: {exc}") from None
        finally:
            if left_fd is not None:
                os.close(left_fd)
    finally:
        os.close(right_fd)
    out.finish()
    return LayerStats(diff_id="sha256:" + out.hash.hexdigest(), size=out.size, entries=out.entries)
