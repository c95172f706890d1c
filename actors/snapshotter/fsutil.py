"""Filesystem helpers of the snapshotters: disk usage, a faithful tree copy, safe removal."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat

from moord.linux.mount import mount_points

log = logging.getLogger(__name__)

# st_blocks counts 512-byte units whatever the filesystem's block size (stat(2)).
_BLOCK_UNIT = 512


def disk_usage(root: str) -> tuple[int, int]:
    """(bytes allocated, inodes) under `root`, root included; hard links count once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [root]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        inode = (st.st_dev, st.st_ino)
        if inode not in seen:
            seen.add(inode)
            size += st.st_blocks * _BLOCK_UNIT
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as entries:
                stack.extend(entry.path for entry in entries)
    return size, len(seen)


def _copy_xattrs(src: str, dst: str) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as exc:
            # security.* and trusted.* may be refused by the target filesystem or an LSM;
            # containerd ignores those too (moby/buildkit#1189).
            log.debug("xattr %s of %s not copied: %s", name, src, exc)


def _copy_metadata(src_stat: os.stat_result, src: str, dst: str) -> None:
    # Owner before mode: chown(2) clears set-user-ID and set-group-ID bits.
    os.lchown(dst, src_stat.st_uid, src_stat.st_gid)
    _copy_xattrs(src, dst)
    if not stat.S_ISLNK(src_stat.st_mode):
        os.chmod(dst, stat.S_IMODE(src_stat.st_mode))
    os.utime(dst, ns=(src_stat.st_atime_ns, src_stat.st_mtime_ns), follow_symlinks=False)


def _copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        while remaining > 0:
            try:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                shutil.copyfileobj(fin, fout, 1 << 20)
                return
            if copied == 0:
                break
            remaining -= copied


def copy_tree(src: str, dst: str) -> None:
    """Copy the tree at `src` into the existing directory `dst`, preserving what a layer holds.

    Kept: owners, modes (set-id bits included), timestamps, xattrs, symlinks, hard links
    (within the tree), device nodes, FIFOs and sockets. Directory metadata is applied
    after the directory's contents, so copying does not disturb the copied times.
    """
    links: dict[tuple[int, int], str] = {}
    directories: list[tuple[os.stat_result, str, str]] = [(os.lstat(src), src, dst)]
    stack = [(src, dst)]
    while stack:
        src_dir, dst_dir = stack.pop()
        with os.scandir(src_dir) as entries:
            for entry in entries:
                source = entry.path
                target = os.path.join(dst_dir, entry.name)
                st = entry.stat(follow_symlinks=False)
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    os.mkdir(target, 0o700)
                    directories.append((st, source, target))
                    stack.append((source, target))
                    continue
                if st.st_nlink > 1:
                    first = links.get((st.st_dev, st.st_ino))
                    if first is not None:
                        os.link(first, target, follow_symlinks=False)
                        continue
                    links[(st.st_dev, st.st_ino)] = target
                if stat.S_ISREG(mode):
                    _copy_file(source, target)
                elif stat.S_ISLNK(mode):
                    os.symlink(os.readlink(source), target)
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                    os.mknod(target, mode, st.st_rdev)
                else:
                    raise OSError(errno.EINVAL, f"cannot copy {source}: unknown file type {oct(stat.S_IFMT(mode))}")
                _copy_metadata(st, source, target)
    for st, source, target in reversed(directories):
        _copy_metadata(st, source, target)


def remove_tree(path: str) -> None:
    """Remove `path` and everything below it; a missing path is fine.

    Refuses to descend into a mount point: removing a snapshot directory must never
    delete files of a filesystem that is still mounted somewhere inside it.
    """
    if not os.path.lexists(path):
        return
    root = os.path.realpath(path)
    busy = [p for p in mount_points() if p == root or p.startswith(root + "/")]
    if busy:
        raise OSError(errno.EBUSY, f"cannot remove {path}: {busy[0]} is still mounted", path)
    shutil.rmtree(path)
