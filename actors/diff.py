"""The layer applier: unpack one OCI layer (tar, tar+gzip, tar+zstd) onto a directory.

What it guarantees:

- The diff ID (sha256 of the uncompressed tar) is computed while applying, over every
  byte up to EOF, so the caller can check it against the image config.
- Nothing is written or linked outside the target. Every entry's parent directory is
  opened with openat2(RESOLVE_IN_ROOT): `..` and symlinks (absolute or relative) are
  resolved as if the target were `/`, which is containerd's reading of a layer too.
  Where openat2 is missing, an openat walk with O_NOFOLLOW resolves the same way by
  hand. Entries are then created relative to that directory fd, never by path.
- Whiteouts: in "overlay" mode (applying to an overlay upperdir) `.wh.<name>` becomes a
  0/0 character device and `.wh..wh..opq` sets trusted.overlay.opaque=y on its
  directory; in "native" mode they remove what they name.
- Caps on uncompressed bytes and on entries turn decompression bombs into
  InvalidArgument before they fill a disk.

Speed: the tar format is parsed here (not by tarfile), with the parent directory fd
cached between entries, so a small file costs one open, its writes, fchown, fchmod,
futimens and close, as with GNU tar.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import posixpath
import queue
import shutil
import stat
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Sequence

from moord.messages.errors import Internal, InvalidArgument, MoordError

log = logging.getLogger(__name__)

MODE_OVERLAY = "overlay"
MODE_NATIVE = "native"
DEFAULT_MAX_BYTES = 64 * 1024**3
DEFAULT_MAX_ENTRIES = 4_000_000
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
# Extended headers (pax, GNU long names) larger than this are refused.
MAX_META_BYTES = 1024 * 1024
_READ_CHUNK = 256 * 1024
_OUT_CHUNK = 1024 * 1024
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_MAX_SYMLINKS = 40
_PARENT_CACHE = 64
# Clamp timestamps to what utimensat takes (containerd bounds them too).
_MAX_NS = 2**62

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# openat2(2): the kernel resolves the path with the dirfd as "/", race-free.
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


from moord.linux.libc import libc as _libc  # noqa: E402
_libc.syscall.restype = ctypes.c_long


def openat2_in_root(root_fd: int, path: str, flags: int) -> int:
    """Open `path` below the directory `root_fd`, resolving `..` and symlinks inside it.

    Raises OSError (ENOSYS where the kernel or a seccomp filter lacks openat2).
    """
    how = _OpenHow(flags, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), ctypes.c_char_p(os.fsencode(path or ".")),
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


@dataclass
class ApplyResult:
    """What applying a layer produced."""

    diff_id: str
    size: int
    entries: int
    compressed_digest: str
    compressed_size: int
    compression: str


def detect_compression(head: bytes) -> str:
    """"gzip", "zstd" or "none" from a stream's first bytes; other compressions are refused."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ\x00"):
        raise InvalidArgument("layer compression not supported (want tar, tar+gzip or tar+zstd)")
    return "none"


# -- the byte stream -----------------------------------------------------------------


class _Raw:
    """The compressed input, hashed and counted as it is read."""

    def __init__(self, source: BinaryIO | int) -> None:
        self._source = source
        self.hash: Any = hashlib.sha256()
        self.size = 0
        self._pushback = b""

    def read(self, n: int = _READ_CHUNK) -> bytes:
        """Up to `n` bytes; b"" at EOF."""
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
            return data
        return self._read_source(n)

    def _read_source(self, n: int) -> bytes:
        if isinstance(self._source, int):
            data = os.read(self._source, n)
        else:
            data = bytes(self._source.read(n) or b"")
        if self.hash is not None:
            self.hash.update(data)
        self.size += len(data)
        return data

    def stop_hashing(self) -> None:
        """For an uncompressed layer the tape's hash is the same digest: do not hash twice."""
        self.hash = None

    def peek(self, n: int) -> bytes:
        """The first `n` bytes (fewer at EOF), kept for the next read."""
        while len(self._pushback) < n:
            more = self._read_source(n - len(self._pushback))
            if not more:
                break
            self._pushback += more
        return self._pushback[:n]


def _decompressor(raw: _Raw, kind: str) -> Callable[[], bytes]:
    """A function returning the next piece (at most _OUT_CHUNK bytes) of the tar; b"" at EOF."""
    if kind == "none":
        return lambda: raw.read(_OUT_CHUNK)
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise InvalidArgument("tar+zstd layers need the zstandard module") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=_READ_CHUNK, read_across_frames=True)

        def next_zstd() -> bytes:
            try:
                return reader.read(_OUT_CHUNK)
            except zstandard.ZstdError as exc:
                raise InvalidArgument(f"corrupt zstd layer: {exc}") from None

        return next_zstd

    state = {"d": zlib.decompressobj(31), "pending": b""}

    def next_gzip() -> bytes:
        # Bounded output per call (max_length): a bomb cannot balloon memory.
        d = state["d"]
        while True:
            data = d.unconsumed_tail or state["pending"] or raw.read(_READ_CHUNK)
            state["pending"] = b""
            if not data:
                if not d.eof:
                    raise InvalidArgument("truncated gzip layer")
                return b""
            if d.eof:
                # More data after a gzip member: another member follows, or zero padding.
                if not data.strip(b"\x00"):
                    continue
                d = state["d"] = zlib.decompressobj(31)
            try:
                out = d.decompress(data, _OUT_CHUNK)
            except zlib.error as exc:
                raise InvalidArgument(f"corrupt gzip layer: {exc}") from None
            if d.eof and d.unused_data:
                state["pending"] = d.unused_data
            if out:
                return out

    return next_gzip


class _Prefetch:
    """Runs a decompressor one thread ahead (zlib and zstd release the GIL), so a layer's
    inflating overlaps the creation of its files."""

    def __init__(self, produce: Callable[[], bytes], depth: int = 4) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name="layer-inflate", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], bytes]) -> None:
        try:
            while not self._stop.is_set():
                chunk = produce()
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __call__(self) -> bytes:
        if self._eof:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        if not item:
            self._eof = True
        return item

    def close(self) -> None:
        """Stop the thread (the apply ended, perhaps before the end of the layer)."""
        self._stop.set()
        self._thread.join(timeout=5)


class _Tape:
    """The uncompressed tar: hashed, counted against the cap, read in exact pieces."""

    def __init__(self, produce: Callable[[], bytes], max_bytes: int) -> None:
        self._produce = produce
        self._max = max_bytes
        self._buf = b""
        self._pos = 0
        self.hash = hashlib.sha256()
        self.total = 0

    def _fill(self) -> bool:
        chunk = self._produce()
        if not chunk:
            return False
        self.total += len(chunk)
        if self.total > self._max:
            raise InvalidArgument(f"layer exceeds the limit of {self._max} uncompressed bytes")
        self.hash.update(chunk)
        rest = self._buf[self._pos:]
        self._buf = rest + chunk if rest else chunk
        self._pos = 0
        return True

    def take(self, n: int) -> bytes:
        """Exactly `n` bytes; InvalidArgument when the tar ends early."""
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise InvalidArgument("truncated tar stream")
        start = self._pos
        self._pos += n
        return self._buf[start:self._pos]

    def take_block(self) -> bytes | None:
        """The next 512-byte header block, or None at a clean EOF."""
        if len(self._buf) - self._pos < _BLOCK:
            while len(self._buf) - self._pos < _BLOCK:
                if not self._fill():
                    if self._pos == len(self._buf):
                        return None
                    raise InvalidArgument("truncated tar stream")
        start = self._pos
        self._pos += _BLOCK
        return self._buf[start:self._pos]

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next `n` bytes to `fd`."""
        while n > 0:
            if self._pos == len(self._buf) and not self._fill():
                raise InvalidArgument("truncated tar stream")
            end = min(len(self._buf), self._pos + n)
            view = memoryview(self._buf)[self._pos:end]
            while view:
                written = os.write(fd, view)
                view = view[written:]
            n -= end - self._pos
            self._pos = end

    def skip(self, n: int) -> None:
        """Pass over the next `n` bytes (still hashed)."""
        while n > 0:
            if self._pos == len(self._buf) and not self._fill():
                raise InvalidArgument("truncated tar stream")
            step = min(n, len(self._buf) - self._pos)
            self._pos += step
            n -= step

    def drain(self) -> None:
        """Read to EOF: trailing bytes count for the diff ID as well."""
        self._buf, self._pos = b"", 0
        while self._fill():
            self._buf, self._pos = b"", 0


# -- tar headers ----------------------------------------------------------------------


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise InvalidArgument(f"invalid number {text[:20]!r} in tar header") from None


def _text(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, bytes]:
    """Parse pax extended header records ("<len> <key>=<value>\\n")."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding after the last record
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise InvalidArgument("malformed pax header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InvalidArgument("malformed pax header length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1] != 0x0A:
            raise InvalidArgument("malformed pax header record")
        key, sep, value = data[space + 1:end - 1].partition(b"=")
        if not sep:
            raise InvalidArgument("malformed pax header record (no '=')")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _pax_time_ns(value: bytes) -> int:
    text = value.decode("ascii", "replace").strip()
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    try:
        return sign * (int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9]))
    except ValueError:
        raise InvalidArgument(f"invalid pax time {text[:40]!r}") from None


def _clean(name: str) -> str:
    """An entry name relative to the root, `..` and absolute paths clamped to the root."""
    if name.startswith("./"):
        name = name[2:]
    if name and name[0] not in "./" and "/." not in name and "//" not in name and name[-1] != "/":
        return name  # already clean: the common case, without normpath's cost
    return posixpath.normpath("/" + name.lstrip("/"))[1:]


# -- the applier --------------------------------------------------------------------


_SAFE_XATTR_PREFIXES = ("user.", "security.", "trusted.", "system.posix_acl_")


def xattr_allowed(key: str) -> bool:
    """Xattrs a layer may set: not trusted.overlay.* (they would steer overlayfs itself)."""
    return key.startswith(_SAFE_XATTR_PREFIXES) and not key.startswith("trusted.overlay.")


class _Applier:
    def __init__(self, target: str, mode: str, parents: Sequence[str], devices: bool, max_entries: int) -> None:
        if mode not in (MODE_OVERLAY, MODE_NATIVE):
            raise InvalidArgument(f"unknown apply mode {mode!r} (want overlay or native)")
        self.mode = mode
        self.devices = devices
        self.max_entries = max_entries
        self.root_fd = os.open(target, _DIR_FLAGS | os.O_NOFOLLOW)
        self.parent_fds: list[int] = []
        for parent in parents:
            try:
                self.parent_fds.append(os.open(parent, _DIR_FLAGS | os.O_NOFOLLOW))
            except OSError as exc:
                log.warning("parent layer %s unusable for directory attributes: %s", parent, exc)
        self.cache: OrderedDict[str, int] = OrderedDict()
        self.setgid_dirs: set[int] = set()  # cached fds of setgid directories
        self.generation = 0  # bumped whenever cached fds are dropped
        self.use_openat2 = True
        self.is_root = os.geteuid() == 0
        self.dirs: list[tuple[str, int]] = []
        self.unpacked: set[str] = set()
        self.entries = 0
        self.skipped_devices = 0

    def close(self) -> None:
        self._forget()
        for fd in [self.root_fd, *self.parent_fds]:
            os.close(fd)
        self.parent_fds = []

    # -- resolving directories -------------------------------------------------------

    def _forget(self) -> None:
        """Drop cached directory fds: after a removal a cached path may name something else."""
        for fd in self.cache.values():
            os.close(fd)
        self.cache.clear()
        self.setgid_dirs.clear()
        self.generation += 1

    def parent(self, rel: str) -> int:
        """An fd of directory `rel` (created when missing), resolved inside the root."""
        fd = self.cache.get(rel)
        if fd is not None:
            self.cache.move_to_end(rel)
            return fd
        fd = self._open_dir(rel)
        self.cache[rel] = fd
        if os.fstat(fd).st_mode & stat.S_ISGID:
            self.setgid_dirs.add(fd)
        if len(self.cache) > _PARENT_CACHE:
            _, old = self.cache.popitem(last=False)
            self.setgid_dirs.discard(old)
            os.close(old)
        return fd

    def _open_dir(self, rel: str, create: bool = True) -> int:
        if self.use_openat2:
            try:
                return openat2_in_root(self.root_fd, rel, _DIR_FLAGS)
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EPERM):
                    self.use_openat2 = False  # old kernel or a seccomp filter: walk by hand
                elif exc.errno == errno.ENOENT and create:
                    pass  # create the missing components below
                elif exc.errno == errno.ENOTDIR:
                    raise InvalidArgument(f"{rel}: a path component is not a directory") from None
                elif exc.errno == errno.ELOOP:
                    raise InvalidArgument(f"{rel}: too many levels of symbolic links") from None
                elif exc.errno != errno.EAGAIN:
                    raise
        return self._walk(rel, create)

    def _walk(self, rel: str, create: bool) -> int:
        """Resolve `rel` component by component with O_NOFOLLOW, symlinks read and scoped to the root."""
        stack = [os.dup(self.root_fd)]
        names: list[str] = []
        pending = [p for p in rel.split("/") if p not in ("", ".")]
        pending.reverse()  # a stack: the next component is at the end
        links = 0
        try:
            while pending:
                comp = pending.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                        names.pop()
                    continue
                try:
                    fd = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=stack[-1])
                except FileNotFoundError:
                    if not create:
                        raise InvalidArgument(f"{rel}: no such directory") from None
                    self._make_dir(stack[-1], comp, "/".join([*names, comp]))
                    pending.append(comp)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise InvalidArgument(f"{rel}: {'/'.join([*names, comp])} is not a directory") from None
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise InvalidArgument(f"{rel}: too many levels of symbolic links") from None
                    link = os.readlink(comp, dir_fd=stack[-1])
                    if link.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                        names.clear()
                    pending.extend(reversed([p for p in link.split("/") if p not in ("", ".")]))
                    continue
                stack.append(fd)
                names.append(comp)
            return stack.pop()
        finally:
            for fd in stack:
                os.close(fd)

    def _make_dir(self, dir_fd: int, name: str, rel: str) -> None:
        """Create a directory the layer implies but does not list (like the parents' one)."""
        mode, uid, gid, mtime_ns = 0o755, 0, 0, None
        for lower in self.parent_fds:
            try:
                fd = openat2_in_root(lower, rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                mode, uid, gid, mtime_ns = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns
                break
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        if self.is_root:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.chmod(name, mode, dir_fd=dir_fd)
        if mtime_ns is not None:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def clear(self, parent_rel: str, dir_fd: int, name: str) -> int:
        """Remove `name` to make room for an entry; returns a fresh fd of its directory.

        Cached directory fds are dropped first: a removed directory or symlink may
        have been part of a cached path.
        """
        self.remove(dir_fd, name)
        self._forget()
        return self.parent(parent_rel)

    def remove(self, dir_fd: int, name: str) -> None:
        """Remove `name` (a whole tree for a directory) without following any symlink.

        Callers drop the directory cache afterwards (see `clear`).
        """
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            shutil.rmtree(name, dir_fd=dir_fd)
        except PermissionError:
            # unlink(2) of a directory answers EPERM on some filesystems.
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=dir_fd)
            else:
                raise

    def finish_dirs(self) -> None:
        """Set directory mtimes last: creating their entries changed them."""
        self._forget()
        for rel, mtime_ns in self.dirs:
            try:
                fd = self._open_dir(rel, create=False)
            except (OSError, InvalidArgument):
                continue  # removed by a later whiteout or replaced: nothing to stamp
            try:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)

    # -- entries -------------------------------------------------------------------

    def whiteout(self, rel: str, parent_rel: str, base: str, uid: int, gid: int) -> None:
        pfd = self.parent(parent_rel)
        if base == WHITEOUT_OPAQUE:
            if self.mode == MODE_OVERLAY:
                os.setxattr(pfd, OVERLAY_OPAQUE_XATTR, b"y")
            else:
                prefix = parent_rel + "/" if parent_rel else ""
                doomed = [e.name for e in os.scandir(pfd) if prefix + e.name not in self.unpacked]
                for name in doomed:
                    self.remove(pfd, name)
                if doomed:
                    self._forget()
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk and the like): nothing to apply
        name = base[len(WHITEOUT_PREFIX):]
        if name in ("", ".", ".."):
            raise InvalidArgument(f"invalid whiteout {rel!r}")
        pfd = self.clear(parent_rel, pfd, name)
        if self.mode == MODE_OVERLAY:
            os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=pfd)
            if self.is_root:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def set_xattrs(self, target: int | str, xattrs: dict[str, bytes], rel: str) -> None:
        for key, value in xattrs.items():
            if not xattr_allowed(key):
                log.warning("%s: xattr %s ignored", rel, key)
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=False) if isinstance(target, str) else os.setxattr(target, key, value)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EPERM):
                    log.warning("%s: xattr %s not supported here: %s", rel, key, exc.strerror)
                    continue
                raise


def apply_layer(
    source: str | BinaryIO | int,
    target: str,
    *,
    mode: str = MODE_NATIVE,
    parents: Sequence[str] = (),
    devices: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    source_verified: bool = False,
    prefetch: bool = False,
) -> ApplyResult:
    """Apply a layer (a path, a readable binary stream or an fd) onto directory `target`.

    `mode` "overlay" writes overlay whiteouts (for an overlay upperdir), "native" removes
    what whiteouts name. `parents` (an overlay's lowerdirs, nearest first) give the
    attributes of directories the layer implies but does not list. `devices` False
    skips device nodes. Hostile or malformed input raises InvalidArgument; the diff
    ID covers the whole uncompressed stream. `source_verified`: the compressed bytes'
    digest is checked elsewhere (the content store's commit), so it is not computed
    again (compressed_digest is then "" for a compressed layer). `prefetch` inflates in a
    second thread, overlapping decompression with file creation.
    """
    if isinstance(source, str):
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return apply_layer(
                fd, target, mode=mode, parents=parents, devices=devices, max_bytes=max_bytes,
                max_entries=max_entries, source_verified=source_verified, prefetch=prefetch,
            )
        finally:
            os.close(fd)
    raw = _Raw(source)
    kind = detect_compression(raw.peek(6))
    hashed = kind != "none" and not source_verified
    if not hashed:
        raw.stop_hashing()
    produce = _decompressor(raw, kind)
    ahead = _Prefetch(produce) if prefetch and kind != "none" else None
    tape = _Tape(ahead or produce, max_bytes)
    try:
        applier = _Applier(target, mode, parents, devices, max_entries)
    except BaseException:
        if ahead is not None:
            ahead.close()
        raise
    try:
        _run(tape, applier)
        tape.drain()
        applier.finish_dirs()
    except MoordError:
        raise
    except OSError as exc:
        raise _os_error(exc) from None
    except (ValueError, UnicodeError) as exc:
        raise InvalidArgument(f"invalid layer: {exc}") from None
    finally:
        applier.close()
        if ahead is not None:
            ahead.close()
    while raw.read(_READ_CHUNK):  # the compressed digest covers the whole input
        pass
    diff_id = "sha256:" + tape.hash.hexdigest()
    return ApplyResult(
        diff_id=diff_id,
        size=tape.total,
        entries=applier.entries,
        compressed_digest=("sha256:" + raw.hash.hexdigest()) if hashed else (diff_id if kind == "none" else ""),
        compressed_size=raw.size,
        compression=kind,
    )


_ARCHIVE_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.ELOOP, errno.EISDIR, errno.EXDEV, errno.ENAMETOOLONG, errno.EINVAL, errno.EMLINK, errno.ENOTEMPTY, errno.EPERM}


def _os_error(exc: OSError) -> MoordError:
    """Failures the archive causes are InvalidArgument; the host's own (ENOSPC, EIO) Internal."""
    what = f"applying layer: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return InvalidArgument(what) if exc.errno in _ARCHIVE_ERRNOS else Internal(what)


# name, mode, uid, gid, size, mtime, checksum, typeflag, linkname, magic, (version,
# uname, gname, devmajor, devminor skipped), prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2x32x32x8x8x155s12x")
_META_TYPES = frozenset((b"x", b"g", b"L", b"K"))
_FILE_TYPES = frozenset((b"0", b"\x00", b"7"))
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SMALL_FILE = 256 * 1024


def _process_umask() -> int:
    """The umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777  # unknown: always fchmod


def _run(tape: _Tape, ap: _Applier) -> None:
    """The entry loop: headers, long names and pax records, then one action per entry.

    This loop is the applier's hot path (a layer of small files is mostly headers), so
    it reads the tape's buffer directly and binds what it calls to locals.
    """
    pax: dict[str, bytes] = {}
    long_name: str | None = None
    long_link: str | None = None
    headers = 0
    max_entries = ap.max_entries
    overlay = ap.mode == MODE_OVERLAY
    is_root = ap.is_root
    unpacked = ap.unpacked
    setgid_dirs = ap.setgid_dirs
    # open(2) applies the umask: fchmod only when it took bits away or for special bits.
    umask_or_special = _process_umask() | 0o7000
    unpack_header = _HEADER.unpack
    adler32 = zlib.adler32
    o_open, o_write, o_close, o_utime, o_fchown, o_fchmod = os.open, os.write, os.close, os.utime, os.fchown, os.fchmod
    last_rel: str | None = None
    last_pfd = -1
    last_generation = -1
    buf, pos = tape._buf, tape._pos
    while True:
        end = pos + _BLOCK
        if end <= len(buf):
            hdr = buf[pos:end]
            pos = end
        else:
            tape._pos = pos
            block = tape.take_block()
            buf, pos = tape._buf, tape._pos
            if block is None:
                return
            hdr = block
        if hdr == _ZERO_BLOCK:
            tape._pos = pos
            return
        headers += 1
        if headers > max_entries:
            raise InvalidArgument(f"layer exceeds the limit of {max_entries} entries")
        (f_name, f_mode, f_uid, f_gid, f_size, f_mtime, f_sum, typeflag, f_link, f_magic, f_prefix) = unpack_header(hdr)
        # The checksum is the byte sum with the checksum field read as spaces; adler32's
        # low half is (1 + byte sum) mod 65521, which is far cheaper than sum() here.
        if ((adler32(hdr) & 0xFFFF) - 1 - sum(f_sum) + 256 - _number(f_sum)) % 65521:
            raise InvalidArgument("tar header checksum mismatch (corrupt or not a tar)")
        try:
            size = int(f_size[:-1], 8)  # octal text ending in NUL or space: the common case
        except ValueError:
            size = _number(f_size)
        if size < 0:
            raise InvalidArgument("negative size in tar header")
        padded = (size + 511) & ~511

        if typeflag in _META_TYPES:  # they describe the next header
            if size > MAX_META_BYTES:
                raise InvalidArgument(f"tar extended header of {size} bytes exceeds {MAX_META_BYTES}")
            tape._pos = pos
            data = tape.take(padded)[:size]
            buf, pos = tape._buf, tape._pos
            if typeflag == b"x":
                pax.update(_pax_records(data))
            elif typeflag == b"L":
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            elif typeflag == b"K":
                long_link = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            continue  # "g" (global pax) carries nothing we apply

        name = f_name.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        if f_prefix[0] and f_magic == b"ustar\x00":
            name = _text(f_prefix) + "/" + name
        try:
            mode = int(f_mode[:-1], 8) & 0o7777
            uid = int(f_uid[:-1], 8)
            gid = int(f_gid[:-1], 8)
            mtime_ns = int(f_mtime[:-1], 8) * 1_000_000_000
        except ValueError:
            mode = _number(f_mode) & 0o7777
            uid = _number(f_uid)
            gid = _number(f_gid)
            mtime_ns = _number(f_mtime) * 1_000_000_000
        linkname = ""
        xattrs: dict[str, bytes] | None = None  # a dict per entry would only feed the GC
        if long_name is not None:
            name, long_name = long_name, None
        if long_link is not None:
            linkname, long_link = long_link, None
        elif f_link[0]:
            linkname = _text(f_link)
        if pax:
            for key, value in pax.items():
                if key == "path":
                    name = value.decode("utf-8", "surrogateescape")
                elif key == "linkpath":
                    linkname = value.decode("utf-8", "surrogateescape")
                elif key == "size":
                    size = int(value)
                    padded = (size + 511) & ~511
                elif key == "uid":
                    uid = int(value)
                elif key == "gid":
                    gid = int(value)
                elif key == "mtime":
                    mtime_ns = _pax_time_ns(value)
                elif key.startswith("SCHILY.xattr."):
                    if xattrs is None:
                        xattrs = {}
                    xattrs[key[13:]] = value
                elif key.startswith("GNU.sparse."):
                    raise InvalidArgument("sparse files in layers are not supported")
            pax = {}
            if size < 0:
                raise InvalidArgument("negative size in pax header")
        if typeflag in _FILE_TYPES and name[-1:] == "/":
            typeflag = b"5"  # old tars mark directories by the trailing slash only
        if not -_MAX_NS <= mtime_ns <= _MAX_NS:
            mtime_ns = _MAX_NS if mtime_ns > 0 else -_MAX_NS
        if uid < 0 or gid < 0 or uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
            raise InvalidArgument(f"{name[:200]}: invalid owner {uid}:{gid}")

        rel = _clean(name)
        if not rel or typeflag in (b"V", b"D"):
            pos = _skip(tape, pos, padded)  # the root itself (containerd ignores it too), labels, dumpdirs
            buf = tape._buf
            continue
        if typeflag in (b"S", b"M"):
            raise InvalidArgument(f"{rel}: sparse and multi-volume tar entries are not supported")
        ap.entries += 1
        parent_rel, _, base = rel.rpartition("/")

        if base.startswith(WHITEOUT_PREFIX):
            pos = _skip(tape, pos, padded)
            buf = tape._buf
            ap.whiteout(rel, parent_rel, base, uid, gid)
            continue

        if parent_rel == last_rel and ap.generation == last_generation:
            pfd = last_pfd
        else:
            pfd = ap.parent(parent_rel)
            last_rel, last_pfd, last_generation = parent_rel, pfd, ap.generation
        # A new inode is already root:root unless its directory is setgid: skip that chown.
        chown = is_root and (uid or gid or pfd in setgid_dirs)
        if typeflag in _FILE_TYPES:
            try:
                fd = o_open(base, _CREATE_FLAGS, mode & 0o777, dir_fd=pfd)
            except FileExistsError:
                pfd = ap.clear(parent_rel, pfd, base)
                fd = o_open(base, _CREATE_FLAGS, mode & 0o777, dir_fd=pfd)
            try:
                if size:
                    if pos + padded <= len(buf):
                        view = memoryview(buf)[pos:pos + size]
                        while view:
                            view = view[o_write(fd, view):]
                        pos += padded
                    else:
                        tape._pos = pos
                        tape.copy_to(fd, size)
                        tape.skip(padded - size)
                        buf, pos = tape._buf, tape._pos
                if chown:
                    o_fchown(fd, uid, gid)
                if xattrs:
                    ap.set_xattrs(fd, xattrs, rel)
                if chown or mode & umask_or_special:
                    o_fchmod(fd, mode)  # after fchown, which clears setuid bits
                o_utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                o_close(fd)
        else:
            if padded:
                pos = _skip(tape, pos, padded)
                buf = tape._buf
            if typeflag == b"5":
                _make_directory(ap, pfd, parent_rel, base, rel, mode, uid, gid, mtime_ns, xattrs, chown, umask_or_special)
            elif typeflag == b"2":
                _make_symlink(ap, pfd, parent_rel, base, rel, linkname, uid, gid, mtime_ns, xattrs, chown)
            elif typeflag == b"1":
                _make_hardlink(ap, pfd, parent_rel, base, rel, linkname)
            elif typeflag in (b"3", b"4", b"6"):
                _make_node(ap, pfd, parent_rel, base, rel, typeflag, hdr, mode, uid, gid, mtime_ns, xattrs, chown, umask_or_special)
            else:
                raise InvalidArgument(f"{rel}: unsupported tar entry type {typeflag!r}")
        if not overlay:
            unpacked.add(rel)


def _skip(tape: _Tape, pos: int, n: int) -> int:
    """Skip `n` bytes from buffer position `pos`; returns the new position in tape._buf."""
    tape._pos = pos
    tape.skip(n)
    return tape._pos


def _make_directory(
    ap: _Applier, pfd: int, parent_rel: str, base: str, rel: str, mode: int, uid: int, gid: int,
    mtime_ns: int, xattrs: dict[str, bytes] | None, chown: bool, umask_or_special: int,
) -> None:
    fresh = True
    try:
        os.mkdir(base, mode & 0o777, dir_fd=pfd)
    except FileExistsError:
        if stat.S_ISDIR(os.stat(base, dir_fd=pfd, follow_symlinks=False).st_mode):
            fresh = False  # merge: the layer's attributes win
        else:
            pfd = ap.clear(parent_rel, pfd, base)
            os.mkdir(base, mode & 0o777, dir_fd=pfd)
    if chown or (ap.is_root and not fresh):
        os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
    if xattrs:
        dfd = os.open(base, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            ap.set_xattrs(dfd, xattrs, rel)
        finally:
            os.close(dfd)
    if not fresh or chown or mode & umask_or_special:
        os.chmod(base, mode, dir_fd=pfd)  # a directory we just made or checked: no symlink
    ap.dirs.append((rel, mtime_ns))


def _make_symlink(
    ap: _Applier, pfd: int, parent_rel: str, base: str, rel: str, linkname: str, uid: int, gid: int,
    mtime_ns: int, xattrs: dict[str, bytes] | None, chown: bool,
) -> None:
    # The link's text is stored as is: it is never followed here except by openat2
    # or the walk, both of which keep it inside the root.
    try:
        os.symlink(linkname, base, dir_fd=pfd)
    except FileExistsError:
        pfd = ap.clear(parent_rel, pfd, base)
        os.symlink(linkname, base, dir_fd=pfd)
    if chown:
        os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
    if xattrs:
        ap.set_xattrs(f"/proc/self/fd/{pfd}/{base}", xattrs, rel)
    os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)


def _make_hardlink(ap: _Applier, pfd: int, parent_rel: str, base: str, rel: str, linkname: str) -> None:
    # The target is resolved inside the root like any entry name. The header's owner
    # and mode are not applied: the link shares its target's inode, and a hard link
    # must not be a way to make an existing file setuid.
    target = _clean(linkname)
    if not target:
        raise InvalidArgument(f"{rel}: hard link to the root")
    tparent, _, tbase = target.rpartition("/")
    tfd = ap._open_dir(tparent, create=False)
    try:
        try:
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            pfd = ap.clear(parent_rel, pfd, base)
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise InvalidArgument(f"{rel}: hard link target {linkname[:200]!r} does not exist") from None
    finally:
        os.close(tfd)


def _make_node(
    ap: _Applier, pfd: int, parent_rel: str, base: str, rel: str, typeflag: bytes, hdr: bytes, mode: int,
    uid: int, gid: int, mtime_ns: int, xattrs: dict[str, bytes] | None, chown: bool, umask_or_special: int,
) -> None:
    if typeflag != b"6" and not ap.devices:
        ap.skipped_devices += 1
        return
    kind = {b"3": stat.S_IFCHR, b"4": stat.S_IFBLK, b"6": stat.S_IFIFO}[typeflag]
    device = os.makedev(_number(hdr[329:337]), _number(hdr[337:345])) if typeflag != b"6" else 0
    try:
        os.mknod(base, kind | (mode & 0o777), device, dir_fd=pfd)
    except FileExistsError:
        pfd = ap.clear(parent_rel, pfd, base)
        os.mknod(base, kind | (mode & 0o777), device, dir_fd=pfd)
    if chown:
        os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
    if xattrs:
        ap.set_xattrs(f"/proc/self/fd/{pfd}/{base}", xattrs, rel)
    if chown or mode & umask_or_special:
        os.chmod(base, mode, dir_fd=pfd)  # a node we just made: no symlink
    os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)


def layers_from_mounts(mounts: Iterable[Any]) -> tuple[str, list[str]] | None:
    """(upperdir, lowerdirs) when `mounts` is one overlay mount with an upperdir, else None.

    containerd applies such a layer straight onto the upperdir with overlay whiteouts;
    any other mount set is mounted and applied in native mode.
    """
    mounts = list(mounts)
    if len(mounts) != 1:
        return None
    m = mounts[0]
    mtype = m.get("type") if isinstance(m, dict) else getattr(m, "type", "")
    options = (m.get("options") if isinstance(m, dict) else getattr(m, "options", None)) or []
    if mtype != "overlay":
        return None
    upper, lowers = "", []
    for option in options:
        if option.startswith("upperdir="):
            upper = option[len("upperdir="):]
        elif option.startswith("lowerdir="):
            lowers = option[len("lowerdir="):].split(":")
    return (upper, lowers) if upper else None
