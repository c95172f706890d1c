"""A container's cgroup, read directly: statistics (v1 and v2) and OOM notifications
(v1: an eventfd registered on memory.oom_control; v2: inotify on memory.events, whose
oom_kill counter the kernel bumps, notifying watchers of the file).

Reading the files costs a few open/read calls; `runc events --stats` would cost a
process start per request, which is the density problem containerd users report.
The container's cgroup is its spec's `linux.cgroupsPath` under each hierarchy (runc's
cgroupfs driver), so the reader needs no help from the runtime.
"""

from __future__ import annotations

import os
import time
from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"
UNLIMITED_V1 = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX; anything above is unlimited


def unified() -> bool:
    """Whether /sys/fs/cgroup is a pure cgroup v2 mount."""
    return os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers"))


def _relative(cgroups_path: str) -> str:
    parts = [p for p in cgroups_path.split("/") if p]
    if any(p in (".", "..") for p in parts) or not parts:
        raise ValueError(f"unusable cgroups path {cgroups_path!r}")
    return os.path.join(*parts)


def controller_dir(controller: str, cgroups_path: str) -> str:
    """The directory of a v1 controller's cgroup (or the v2 cgroup when controller is "")."""
    if not controller:
        return os.path.join(CGROUP_ROOT, _relative(cgroups_path))
    return os.path.join(CGROUP_ROOT, controller, _relative(cgroups_path))


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 16).decode(errors="replace")
    except OSError:
        return ""


def _int(path: str) -> int:
    text = _read(path).strip()
    if text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        return 0


def _flat(path: str) -> dict[str, int]:
    """A "key value" per line file (memory.stat, cpu.stat, memory.events)."""
    values: dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def exists(cgroups_path: str) -> bool:
    """Whether the container's cgroup exists (memory controller on v1)."""
    return os.path.isdir(controller_dir("" if unified() else "memory", cgroups_path))


def metrics(cgroups_path: str) -> dict[str, Any]:
    """cpu, memory, pids and io statistics as plain data (see messages.tasks.MetricsReply)."""
    return _metrics_v2(cgroups_path) if unified() else _metrics_v1(cgroups_path)


def _metrics_v1(path: str) -> dict[str, Any]:
    cpuacct = controller_dir("cpuacct", path)
    cpu_stat = _flat(os.path.join(controller_dir("cpu", path), "cpu.stat"))
    memory = controller_dir("memory", path)
    mem_stat = _flat(os.path.join(memory, "memory.stat"))
    limit = _int(os.path.join(memory, "memory.limit_in_bytes"))
    pids = controller_dir("pids", path)
    read_bytes = write_bytes = read_ops = write_ops = 0
    blkio = controller_dir("blkio", path)
    for name, is_bytes in (("blkio.throttle.io_service_bytes", True), ("blkio.throttle.io_serviced", False)):
        for line in _read(os.path.join(blkio, name)).splitlines():
            parts = line.split()
            if len(parts) != 3 or not parts[2].isdigit():
                continue
            if parts[1] == "Read":
                if is_bytes:
                    read_bytes += int(parts[2])
                else:
                    read_ops += int(parts[2])
            elif parts[1] == "Write":
                if is_bytes:
                    write_bytes += int(parts[2])
                else:
                    write_ops += int(parts[2])
    return {
        "cgroup_version": 1,
        "timestamp": time.time(),
        "cpu": {
            "usage_total": _int(os.path.join(cpuacct, "cpuacct.usage")),
            "usage_user": _int(os.path.join(cpuacct, "cpuacct.usage_user")),
            "usage_kernel": _int(os.path.join(cpuacct, "cpuacct.usage_sys")),
            "periods": cpu_stat.get("nr_periods", 0),
            "throttled_periods": cpu_stat.get("nr_throttled", 0),
            "throttled_time": cpu_stat.get("throttled_time", 0),
        },
        "memory": {
            "usage": _int(os.path.join(memory, "memory.usage_in_bytes")),
            "max_usage": _int(os.path.join(memory, "memory.max_usage_in_bytes")),
            "limit": 0 if limit >= UNLIMITED_V1 else limit,
            "cache": mem_stat.get("total_cache", mem_stat.get("cache", 0)),
            "rss": mem_stat.get("total_rss", mem_stat.get("rss", 0)),
            "failcnt": _int(os.path.join(memory, "memory.failcnt")),
            "oom_kills": oom_kills(path),
        },
        "pids": {"current": _int(os.path.join(pids, "pids.current")), "limit": _int(os.path.join(pids, "pids.max"))},
        "io": {"read_bytes": read_bytes, "write_bytes": write_bytes, "read_ops": read_ops, "write_ops": write_ops},
    }


def _metrics_v2(path: str) -> dict[str, Any]:
    base = controller_dir("", path)
    cpu_stat = _flat(os.path.join(base, "cpu.stat"))
    mem_stat = _flat(os.path.join(base, "memory.stat"))
    read_bytes = write_bytes = read_ops = write_ops = 0
    for line in _read(os.path.join(base, "io.stat")).splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if not value.isdigit():
                continue
            if key == "rbytes":
                read_bytes += int(value)
            elif key == "wbytes":
                write_bytes += int(value)
            elif key == "rios":
                read_ops += int(value)
            elif key == "wios":
                write_ops += int(value)
    return {
        "cgroup_version": 2,
        "timestamp": time.time(),
        "cpu": {
            "usage_total": cpu_stat.get("usage_usec", 0) * 1000,
            "usage_user": cpu_stat.get("user_usec", 0) * 1000,
            "usage_kernel": cpu_stat.get("system_usec", 0) * 1000,
            "periods": cpu_stat.get("nr_periods", 0),
            "throttled_periods": cpu_stat.get("nr_throttled", 0),
            "throttled_time": cpu_stat.get("throttled_usec", 0) * 1000,
        },
        "memory": {
            "usage": _int(os.path.join(base, "memory.current")),
            "max_usage": _int(os.path.join(base, "memory.peak")),
            "limit": _int(os.path.join(base, "memory.max")),
            "cache": mem_stat.get("file", 0),
            "rss": mem_stat.get("anon", 0),
            "failcnt": 0,
            "oom_kills": oom_kills(path),
        },
        "pids": {"current": _int(os.path.join(base, "pids.current")), "limit": _int(os.path.join(base, "pids.max"))},
        "io": {"read_bytes": read_bytes, "write_bytes": write_bytes, "read_ops": read_ops, "write_ops": write_ops},
    }


def oom_kills(cgroups_path: str) -> int:
    """How many processes the kernel OOM-killed in the cgroup (-1 if unreadable)."""
    if unified():
        values = _flat(os.path.join(controller_dir("", cgroups_path), "memory.events"))
    else:
        values = _flat(os.path.join(controller_dir("memory", cgroups_path), "memory.oom_control"))
    return values.get("oom_kill", -1)


def watch_oom(cgroups_path: str) -> "OomWatch | CounterWatch":
    """Whichever OOM notification fits the container's memory cgroup: v1 where the memory
    controller is a v1 hierarchy, else memory.events on the unified (v2) tree.

    On a hybrid host the v2 tree is /sys/fs/cgroup/unified; it holds memory.events only
    when the memory controller is bound there. OSError/ValueError when neither exists.
    """
    relative = _relative(cgroups_path)
    if not unified() and os.path.isdir(controller_dir("memory", cgroups_path)):
        return OomWatch(cgroups_path)
    for root in (CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified")):
        events = os.path.join(root, relative, "memory.events")
        if os.path.exists(events):
            return CounterWatch(events, "oom_kill")
    raise FileNotFoundError(f"no memory cgroup for {cgroups_path} (v1 or v2)")


IN_MODIFY = 0x00000002
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


class CounterWatch:
    """One counter of a cgroup v2 keyed file (memory.events `oom_kill`), watched with inotify.

    cgroup v2 notifies a file's watchers (IN_MODIFY) whenever one of its events changes;
    each wake-up is checked against the counter, so only a growth counts. The removal of
    the cgroup need not wake the watch (our watch pins the inode); `gone` tells it.
    Same interface as the v1 OomWatch: fd, fired(), gone(), close().
    """

    def __init__(self, path: str, key: str) -> None:
        from moord.linux.libc import libc

        self.path = path
        self.key = key
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        if libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
            code = ctypes_errno()
            os.close(fd)
            raise OSError(code, f"inotify_add_watch {path}: {os.strerror(code)}")
        self.fd = fd
        self.seen = max(0, self.count())

    def count(self) -> int:
        """The counter's value now (-1 if unreadable)."""
        return _flat(self.path).get(self.key, -1)

    def fired(self) -> bool:
        """Drain the inotify queue; True when the counter grew since the last call."""
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        count = self.count()
        if count > self.seen:
            self.seen = count
            return True
        return False

    def gone(self) -> bool:
        """Whether the watched file (its cgroup) has been removed."""
        return not os.path.exists(self.path)

    def close(self) -> None:
        """Close the inotify fd (its watch goes with it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ctypes_errno() -> int:
    """errno of the last libc call made through ctypes."""
    import ctypes

    return ctypes.get_errno()


class OomWatch:
    """cgroup v1 OOM notification: an eventfd registered through cgroup.event_control.

    The eventfd also fires when the cgroup is removed, so each wake-up is checked
    against the oom_kill counter before it counts as an OOM.
    """

    def __init__(self, cgroups_path: str) -> None:
        self.cgroups_path = cgroups_path
        self.fd = -1
        self.seen = 0
        memory = controller_dir("memory", cgroups_path)
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        control = -1
        try:
            control = os.open(os.path.join(memory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            with open(os.path.join(memory, "cgroup.event_control"), "w") as fh:
                fh.write(f"{efd} {control}")
        except OSError:
            os.close(efd)
            raise
        finally:
            if control >= 0:
                os.close(control)  # the kernel holds its own reference once registered
        self.fd = efd
        self.seen = max(0, oom_kills(cgroups_path))

    def fired(self) -> bool:
        """Drain the eventfd; True when the oom_kill counter grew since the last call."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        count = oom_kills(self.cgroups_path)
        if count > self.seen:
            self.seen = count
            return True
        return False

    def gone(self) -> bool:
        """Whether the watched cgroup has been removed."""
        return not os.path.isdir(controller_dir("memory", self.cgroups_path))

    def close(self) -> None:
        """Close the eventfd (the kernel drops the registration with it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
