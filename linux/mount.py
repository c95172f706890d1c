"""Mounting and unmounting through mount(2) and umount2(2), called via ctypes.

Mounts are described the way containerd describes them: a type ("bind", "overlay", ...),
a source and fstab-style options ("ro", "rbind", "lowerdir=...", ...). Option words that
name a mount flag become flags; every other word is passed to the filesystem as data.

Used by the snapshotter, image unpacking and the runtime: no `mount` binary is run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

log = logging.getLogger(__name__)

from moord.linux.libc import libc as _libc  # noqa: E402
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 0x2
CLONE_FS = 0x200

_PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# option word -> (clears the flag instead of setting it, flag); as fstab(5) and mount(8).
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
    "private": (False, MS_PRIVATE),
    "rprivate": (False, MS_PRIVATE | MS_REC),
    "shared": (False, MS_SHARED),
    "rshared": (False, MS_SHARED | MS_REC),
    "slave": (False, MS_SLAVE),
    "rslave": (False, MS_SLAVE | MS_REC),
    "unbindable": (False, MS_UNBINDABLE),
    "runbindable": (False, MS_UNBINDABLE | MS_REC),
}

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# containerd compacts overlay options a little before the page limit; so do we.
_COMPACT_THRESHOLD = PAGE_SIZE - 512
_LOWERDIR = "lowerdir="


class MountLike(Protocol):
    """Anything with a mount's fields: messages.types.Mount, MountSpec, or a look-alike."""

    type: str
    source: str
    options: list[str]


@dataclass(frozen=True)
class MountSpec:
    """A mount to perform; `target` is a path inside the mount root ("" = the root)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True)
class ParsedOptions:
    """Option words split into mount(2) flags, propagation flags and filesystem data."""

    flags: int
    propagation: int
    data: str


def parse_options(options: Sequence[str]) -> ParsedOptions:
    """Split fstab-style option words into flags and data (later words win, like mount(8))."""
    flags = 0
    data: list[str] = []
    for option in options:
        known = _FLAG_OPTIONS.get(option)
        if known is None:
            if option == "loop":
                raise OSError(errno.EOPNOTSUPP, "loop mounts are not supported")
            data.append(option)
            continue
        clear, flag = known
        flags = flags & ~flag if clear else flags | flag
    propagation = flags & _PROPAGATION
    if propagation:
        propagation |= flags & MS_REC
    return ParsedOptions(flags & ~_PROPAGATION, propagation, ",".join(data))


def _fields(m: MountLike | Mapping[str, Any]) -> MountSpec:
    if isinstance(m, Mapping):
        return MountSpec(str(m.get("type", "")), str(m.get("source", "")), tuple(m.get("options") or ()), str(m.get("target") or ""))
    return MountSpec(m.type, m.source, tuple(m.options or ()), str(getattr(m, "target", "") or ""))


def _oserror(code: int, what: str, target: str) -> OSError:
    return OSError(code, f"{what} {target}: {os.strerror(code)}", target)


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        code = ctypes.get_errno()
        raise _oserror(code, f"mount {fstype or 'none'} {source or '-'} on", target)


def _compact_lowerdirs(options: list[str]) -> tuple[str, list[str]]:
    """Rewrite lowerdir= as paths relative to the layers' common parent (containerd's trick).

    Returns (directory to mount from, new options); ("", options) when nothing is gained.
    """
    index = next((i for i, o in enumerate(options) if o.startswith(_LOWERDIR)), -1)
    if index < 0:
        return "", options
    dirs = options[index][len(_LOWERDIR):].split(":")
    if len(dirs) < 2 or not all(os.path.isabs(d) for d in dirs):
        return "", options
    common = os.path.commonpath(dirs)
    if common == "/":
        return "", options
    relative = [os.path.relpath(d, common) for d in dirs]
    rewritten = options[:index] + options[index + 1:] + [_LOWERDIR + ":".join(relative)]
    return common, rewritten


def _mount_from(directory: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) with `directory` as the working directory, without touching the process's cwd.

    The working directory is shared by all threads of a process, and this daemon runs
    many (bridge, actors): os.chdir under a lock would still move every other thread's
    relative lookups. A fork()ed child is unsafe in a threaded Python. Instead a
    short-lived thread calls unshare(CLONE_FS), which gives that thread alone its own
    cwd/root/umask, chdirs, mounts, and exits, taking its private cwd with it.
    """
    target = os.path.abspath(target)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.unshare(CLONE_FS) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"unshare(CLONE_FS) to mount {target}: {os.strerror(code)}")
            os.chdir(directory)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as exc:  # handed to the calling thread
            outcome.append(exc)

    worker = threading.Thread(target=run, name="mount-at", daemon=True)
    worker.start()
    worker.join()
    if outcome:
        raise outcome[0]


def mount(m: MountLike | Mapping[str, Any], target: str) -> None:
    """Perform one mount on `target` (an existing directory or file)."""
    spec = _fields(m)
    options = list(spec.options)
    workdir = ""
    if spec.type == "overlay" and sum(len(o) for o in options) >= _COMPACT_THRESHOLD:
        workdir, options = _compact_lowerdirs(options)
    parsed = parse_options(options)
    flags = parsed.flags
    if spec.type == "bind":
        flags |= MS_BIND  # "bind" is not a filesystem type: without MS_BIND, mount(2) says ENODEV
    if len(parsed.data) >= PAGE_SIZE:
        raise OSError(
            errno.E2BIG,
            f"mount {spec.type} on {target}: options are {len(parsed.data)} bytes, the kernel takes at most {PAGE_SIZE - 1}",
            target,
        )
    # A remount without new data only changes flags and is done below.
    if not (flags & MS_REMOUNT) or parsed.data:
        if workdir:
            _mount_from(workdir, spec.source, target, spec.type, flags, parsed.data)
        else:
            _sys_mount(spec.source, target, spec.type, flags, parsed.data)
    if parsed.propagation:
        _sys_mount("", target, "", parsed.propagation | MS_SILENT, "")
    # The kernel ignores MS_RDONLY on the first bind: a read-only bind needs a remount.
    if flags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        _sys_mount("", target, "", flags | MS_REMOUNT, "")


def _subtarget(root: str, relative: str) -> str:
    """`root` joined with a mount's own target, refusing anything that leaves `root`."""
    if not relative:
        return root
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EINVAL, f"mount target {relative!r} leaves {root}", root)
    return os.path.join(root, *parts)


def mount_all(mounts: Sequence[MountLike | Mapping[str, Any]], target: str) -> None:
    """Perform `mounts` in order on `target`; on failure undo those already done and raise."""
    done: list[str] = []
    try:
        for m in mounts:
            where = _subtarget(target, _fields(m).target)
            mount(m, where)
            done.append(where)
    except BaseException:
        for where in reversed(done):
            try:
                unmount(where, detach=True)
            except OSError as exc:
                log.warning("undoing mounts: %s", exc)
        raise


def unmount(target: str, detach: bool = False) -> None:
    """Unmount the topmost mount on `target`; a target that is not mounted is left alone.

    EBUSY is retried for a while (a closing file may still pin it); `detach` unmounts
    lazily (MNT_DETACH) instead.
    """
    flags = MNT_DETACH if detach else 0
    encoded = target.encode()
    for _ in range(50):
        if _libc.umount2(encoded, flags) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EINVAL:  # not a mount point
            return
        if code != errno.EBUSY:
            raise _oserror(code, "unmount", target)
        time.sleep(0.05)
    raise _oserror(errno.EBUSY, "unmount", target)


def unmount_all(target: str, detach: bool = False) -> None:
    """Unmount every mount stacked on `target` until it is no mount point (missing: no-op)."""
    if not target or not os.path.lexists(target):
        return
    flags = MNT_DETACH if detach else 0
    encoded = target.encode()
    for _ in range(4096):
        if _libc.umount2(encoded, flags) == 0:
            continue
        code = ctypes.get_errno()
        if code == errno.EINVAL:
            return
        if code == errno.EBUSY:
            unmount(target, detach)  # retries EBUSY for a while, then raises
            continue
        raise _oserror(code, "unmount", target)
    raise _oserror(errno.ELOOP, "unmount (too many stacked mounts)", target)


def _unescape_mountinfo(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def mount_points() -> list[str]:
    """Mount points of this process's mount namespace, in mount order."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split(" ", 5)
            if len(fields) > 4:
                points.append(_unescape_mountinfo(fields[4]))
    return points


def is_mountpoint(path: str) -> bool:
    """Whether something is mounted on `path` (binds of the same filesystem included)."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:
        return False
    return real in mount_points()


@contextlib.contextmanager
def mounted(mounts: Sequence[MountLike | Mapping[str, Any]], parent: str | None = None) -> Iterator[str]:
    """Mount `mounts` on a fresh temporary directory and yield its path.

    On exit everything is unmounted and the directory removed, also on errors.
    """
    target = tempfile.mkdtemp(prefix="moord-mount-", dir=parent)
    try:
        mount_all(mounts, target)
        yield target
    finally:
        try:
            unmount_all(target)
        finally:
            # rmdir, never rmtree: if the unmount failed, the mount's contents must stay.
            with contextlib.suppress(OSError):
                os.rmdir(target)
