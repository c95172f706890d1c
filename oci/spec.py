"""OCI runtime specs: containerd's Linux defaults merged with an image config and options.

Used client-side (moorctl builds the spec it stores in the container record), so this
module imports only the standard library and moord's stdlib-only error classes.

User names are resolved from the rootfs's /etc/passwd and /etc/group; those files are
opened with every path component resolved inside the rootfs, so a symlink in an image
can never make us read a host file.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from moord.messages.errors import InvalidArgument, NotFound

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CGROUP_PARENT = "/moord"
# runc refuses ids above MaxInt32, whatever the kernel allows.
MAX_ID = 2**31 - 1
_MAX_SYMLINKS = 40

DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

DEFAULT_MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]

DEFAULT_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# Every capability by bit number (kernel 5.9's set, as containerd's pkg/cap knows it).
KNOWN_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]

# The device nodes every container may use (containerd's WithDefaultUnixDevices, which
# ctr run applies): (major, minor or None for all minors).
DEFAULT_UNIX_DEVICES = [
    (1, 3),  # /dev/null
    (1, 8),  # /dev/random
    (1, 7),  # /dev/full
    (5, 0),  # /dev/tty
    (1, 5),  # /dev/zero
    (1, 9),  # /dev/urandom
    (5, 1),  # /dev/console
    (136, None),  # /dev/pts/*
    (5, 2),  # /dev/ptmx
]

# Directories under /dev whose nodes are not host devices to hand to a privileged
# container (as containerd's HostDevices skips them).
_SKIPPED_DEV_DIRS = {"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"}


def default_mounts() -> list[dict[str, Any]]:
    """The filesystems every container gets (containerd's defaults plus a read-only cgroup view)."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
        {
            "destination": "/run",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
    ]


def cgroups_path(namespace: str, container_id: str, parent: str = DEFAULT_CGROUP_PARENT) -> str:
    """The cgroup of a container: one per namespace and id under moord's parent."""
    for part in (namespace, container_id):
        if not part or "/" in part or part in (".", ".."):
            raise InvalidArgument(f"invalid cgroup path component {part!r}")
    return f"{parent.rstrip('/')}/{namespace}/{container_id}"


def default_spec(namespace: str, container_id: str, cgroup_parent: str = DEFAULT_CGROUP_PARENT) -> dict[str, Any]:
    """A Linux OCI runtime spec with containerd's defaults (no oomScoreAdj: we never lower it)."""
    # oomScoreAdj is left out on purpose: setting it lower than ours needs
    # CAP_SYS_RESOURCE, which the daemon may not hold.
    return {
        "ociVersion": OCI_VERSION,
        "root": {"path": "rootfs"},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0, "additionalGids": [0]},
            "args": [],
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "noNewPrivileges": True,
            "capabilities": {
                "bounding": list(DEFAULT_CAPABILITIES),
                "permitted": list(DEFAULT_CAPABILITIES),
                "effective": list(DEFAULT_CAPABILITIES),
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "mounts": default_mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}] + default_device_rules()},
            "cgroupsPath": cgroups_path(namespace, container_id, cgroup_parent),
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": list(DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        },
    }


def default_device_rules() -> list[dict[str, Any]]:
    """Cgroup rules allowing containerd's default Unix devices (null, zero, tty, pts...)."""
    rules = []
    for major, minor in DEFAULT_UNIX_DEVICES:
        rule: dict[str, Any] = {"allow": True, "type": "c", "major": major, "access": "rwm"}
        if minor is not None:
            rule["minor"] = minor
        rules.append(rule)
    return rules


def current_capabilities(status_path: str = "/proc/self/status") -> list[str]:
    """The effective capabilities of this process, by name (containerd's cap.Current).

    A privileged container gets these rather than every known capability: where the
    caller lacks one (root here has no CAP_SYS_RESOURCE), asking runc for it would fail.
    """
    with open(status_path, encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                bits = int(line.split(":", 1)[1].strip(), 16)
                return [name for bit, name in enumerate(KNOWN_CAPABILITIES) if bits >> bit & 1]
    raise InvalidArgument(f"no CapEff line in {status_path}")


def host_devices(root: str = "/dev") -> list[dict[str, Any]]:
    """Every block and character device under `root` as OCI LinuxDevice entries (HostDevices).

    pts, shm, fd, mqueue and container-manager dirs are skipped, and so is /dev/console
    (runc sets it up for a terminal); symlinks are never followed.
    """
    devices: list[dict[str, Any]] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return devices
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in _SKIPPED_DEV_DIRS:
                devices.extend(host_devices(entry.path))
            continue
        if entry.name == "console" and root == "/dev":
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # gone while we looked
            continue
        if stat.S_ISBLK(st.st_mode):
            kind = "b"
        elif stat.S_ISCHR(st.st_mode):
            kind = "c"
        else:
            continue  # regular files, symlinks, FIFOs, sockets
        devices.append(
            {
                "path": entry.path,
                "type": kind,
                "major": os.major(st.st_rdev),
                "minor": os.minor(st.st_rdev),
                "fileMode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
            }
        )
    return devices


def make_privileged(spec: dict[str, Any]) -> None:
    """ctr's --privileged: WithPrivileged + WithAllDevicesAllowed + WithHostDevices.

    All of the caller's effective capabilities (bounding, effective, permitted; not
    ambient), no masked or read-only paths, writable /sys and cgroupfs, no seccomp,
    AppArmor or SELinux label, every device allowed and the host's devices created.
    """
    capabilities = current_capabilities()
    spec["process"]["capabilities"] = {key: list(capabilities) for key in ("bounding", "effective", "permitted")}
    linux = spec["linux"]
    linux.pop("maskedPaths", None)
    linux.pop("readonlyPaths", None)
    linux.pop("seccomp", None)
    spec["process"].pop("apparmorProfile", None)
    spec["process"].pop("selinuxLabel", None)
    for mount in spec["mounts"]:
        if mount.get("type") in ("sysfs", "cgroup"):
            mount["options"] = ["rw" if option == "ro" else option for option in mount.get("options", [])]
    linux.setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    linux["devices"] = linux.get("devices", []) + host_devices()


def use_host_network(spec: dict[str, Any], hostname: str = "") -> None:
    """ctr's --net-host: no network namespace, the host's /etc/hosts and /etc/resolv.conf
    bound read-only, and HOSTNAME set (the UTS namespace keeps the host's name unless the
    spec sets another)."""
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
    for path in ("/etc/hosts", "/etc/resolv.conf"):
        spec["mounts"].append({"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]})
    name = hostname or os.uname().nodename
    spec["process"]["env"] = merge_env(spec["process"]["env"], [f"HOSTNAME={name}"])


def check_mounts(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Caller-supplied OCI mounts, checked for shape: absolute destination, string fields."""
    checked = []
    for mount in mounts:
        if not isinstance(mount, dict):
            raise InvalidArgument(f"mount {mount!r} must be an object")
        destination = mount.get("destination")
        if not isinstance(destination, str) or not destination.startswith("/"):
            raise InvalidArgument(f"mount destination {destination!r} must be an absolute path")
        if ".." in destination.split("/"):
            raise InvalidArgument(f"mount destination {destination!r} must not contain '..'")
        for key in ("type", "source"):
            if not isinstance(mount.get(key, ""), str):
                raise InvalidArgument(f"mount {key} {mount.get(key)!r} must be a string")
        options = mount.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise InvalidArgument(f"mount options {options!r} must be a list of strings")
        checked.append(
            {"destination": destination, "type": mount.get("type", ""), "source": mount.get("source", ""), "options": list(options)}
        )
    return checked


def image_config_section(image_config: dict[str, Any] | None) -> dict[str, Any]:
    """The runtime part ("config") of an OCI image config; accepts the whole blob or the part."""
    if not image_config:
        return {}
    if not isinstance(image_config, dict):
        raise InvalidArgument("image config must be a JSON object")
    # A whole image config blob has "config" (and "rootfs", "history"); its runtime part has not.
    section = image_config["config"] if "config" in image_config else image_config
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise InvalidArgument("image config's 'config' must be a JSON object")
    return section


def merge_env(defaults: list[str], overrides: list[str]) -> list[str]:
    """`defaults` with each KEY=VALUE of `overrides` replacing the same KEY or appended."""
    result = list(defaults)
    index = {entry.split("=", 1)[0]: i for i, entry in enumerate(result)}
    for entry in overrides:
        if not isinstance(entry, str):
            raise InvalidArgument(f"environment entry {entry!r} is not a string")
        key = entry.split("=", 1)[0]
        if not key:
            raise InvalidArgument(f"environment entry {entry!r} has no name")
        if key in index:
            result[index[key]] = entry
        else:
            index[key] = len(result)
            result.append(entry)
    return result


def build_spec(
    namespace: str,
    container_id: str,
    image_config: dict[str, Any] | None = None,
    *,
    args: list[str] | None = None,
    env: list[str] | None = None,
    tty: bool = False,
    hostname: str = "",
    readonly_rootfs: bool = False,
    rootfs: str | None = None,
    cwd: str = "",
    user: str = "",
    cgroup_parent: str = DEFAULT_CGROUP_PARENT,
    memory_limit: int = 0,
    cpus: float = 0.0,
    pids_limit: int = 0,
    mounts: list[dict[str, Any]] | None = None,
    privileged: bool = False,
    net_host: bool = False,
    seccomp: bool = False,
    seccomp_profile: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec for a container: defaults, then the image config, then the caller's options,
    applied in ctr run's order.

    `rootfs` is the path of the (mounted) root filesystem, used to resolve user and group
    names; without it only numeric users are accepted. `args` replace the image's Cmd
    (the Entrypoint stays), as with `ctr run IMAGE ID args...`. `mounts` (OCI mounts)
    follow the defaults. `seccomp` applies containerd's default profile, or
    `seccomp_profile` when given (as `ctr run --seccomp [--seccomp-profile]`): like ctr,
    no seccomp filter without it; `privileged` alone also means none.
    """
    if seccomp_profile is not None:
        if not seccomp:
            raise InvalidArgument("a seccomp profile needs seccomp to be enabled")
        if not isinstance(seccomp_profile, dict) or not isinstance(seccomp_profile.get("defaultAction"), str):
            raise InvalidArgument("a seccomp profile must be a JSON object with a defaultAction")
    spec = default_spec(namespace, container_id, cgroup_parent)
    config = image_config_section(image_config)
    process = spec["process"]
    # User mounts go after the defaults, as ctr's WithMounts appends them.
    spec["mounts"].extend(check_mounts(mounts or []))

    image_env = _string_list(config.get("Env"), "Env")
    process["env"] = merge_env(image_env or [DEFAULT_PATH_ENV], env or [])
    entrypoint = _string_list(config.get("Entrypoint"), "Entrypoint")
    cmd = list(args) if args else _string_list(config.get("Cmd"), "Cmd")
    process["args"] = entrypoint + cmd
    if not process["args"]:
        raise InvalidArgument("no command: the image has no Entrypoint or Cmd and no args were given")
    working_dir = cwd or config.get("WorkingDir") or "/"
    if not isinstance(working_dir, str) or not working_dir.startswith("/"):
        raise InvalidArgument(f"working directory {working_dir!r} must be an absolute path")
    process["cwd"] = working_dir

    uid, gid, extra = resolve_user(user or config.get("User") or "", rootfs)
    process["user"] = {"uid": uid, "gid": gid, "additionalGids": extra}

    if tty:
        process["terminal"] = True
        process["env"] = merge_env(process["env"], ["TERM=xterm"])
    if hostname:
        spec["hostname"] = hostname
    if readonly_rootfs:
        spec["root"]["readonly"] = True
    if privileged:
        make_privileged(spec)
    if net_host:
        use_host_network(spec, hostname)
    if seccomp:
        if seccomp_profile is None:
            from moord.oci.seccomp import default_profile

            seccomp_profile = default_profile(process["capabilities"]["bounding"])
        spec["linux"]["seccomp"] = seccomp_profile
    spec["linux"]["resources"].update(resources(memory_limit=memory_limit, cpus=cpus, pids_limit=pids_limit))
    return spec


CPU_PERIOD_US = 100000


def resources(memory_limit: int = 0, cpus: float = 0.0, pids_limit: int = 0) -> dict[str, Any]:
    """OCI LinuxResources for limits (0 = none): bytes of memory, CPUs, number of tasks.

    The memory limit also caps memory+swap, so a container over its limit is OOM-killed
    rather than swapped out.
    """
    result: dict[str, Any] = {}
    if memory_limit < 0 or cpus < 0 or pids_limit < 0:
        raise InvalidArgument("resource limits must not be negative")
    if memory_limit:
        if memory_limit < 4096 * 16:
            raise InvalidArgument(f"memory limit {memory_limit} is below 64 KiB")
        result["memory"] = {"limit": memory_limit, "swap": memory_limit}
    if cpus:
        result["cpu"] = {"quota": max(1000, int(cpus * CPU_PERIOD_US)), "period": CPU_PERIOD_US}
    if pids_limit:
        result["pids"] = {"limit": pids_limit}
    return result


def resolve_user(user: str, rootfs: str | None = None) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) for an image's User: "", "uid", "name", "uid:gid", "name:group".

    Names need `rootfs`; numbers work without it. As in containerd, a numeric user found
    in /etc/passwd takes that entry's gid, and the primary gid heads the additional gids.
    """
    if not isinstance(user, str):
        raise InvalidArgument(f"user {user!r} must be a string")
    passwd = _read_db(rootfs, "/etc/passwd") if rootfs else None
    group = _read_db(rootfs, "/etc/group") if rootfs else None
    name_part, _, group_part = user.partition(":")
    if user.count(":") > 1:
        raise InvalidArgument(f"invalid user {user!r}: want uid[:gid] or name[:group]")
    uid, gid = 0, 0
    username = ""
    if not name_part:
        if group_part:
            raise InvalidArgument(f"invalid user {user!r}: empty user name")
        username = "root"
    elif _is_id(name_part):
        uid = int(name_part)
        entry = _find(passwd, lambda e: e[2] == name_part) if passwd else None
        if entry:
            gid, username = _parse_id(entry[3], "gid"), entry[0]
    else:
        if not rootfs:
            raise InvalidArgument(f"user name {name_part!r} needs the rootfs to resolve it")
        entry = _find(passwd, lambda e: e[0] == name_part)
        if entry is None:
            raise NotFound(f"no user {name_part!r} in the image's /etc/passwd")
        uid, gid, username = _parse_id(entry[2], "uid"), _parse_id(entry[3], "gid"), name_part
    if group_part:
        if _is_id(group_part):
            gid = int(group_part)
        else:
            if not rootfs:
                raise InvalidArgument(f"group name {group_part!r} needs the rootfs to resolve it")
            entry = _find(group, lambda e: e[0] == group_part)
            if entry is None:
                raise NotFound(f"no group {group_part!r} in the image's /etc/group")
            gid = _parse_id(entry[2], "gid")
    extra: list[int] = []
    if username and group:
        for entry in group:
            if entry[0] != username and username in entry[3].split(","):
                extra.append(_parse_id(entry[2], "gid"))
    if gid not in extra:
        extra.insert(0, gid)
    return uid, gid, extra


def dumps(spec: dict[str, Any]) -> bytes:
    """The spec as the JSON bytes stored in a container record."""
    return json.dumps(spec, separators=(",", ":"), sort_keys=True).encode()


def loads(data: bytes | str) -> dict[str, Any]:
    """Parse a stored spec; anything but a JSON object is InvalidArgument."""
    try:
        spec = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"OCI spec is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise InvalidArgument("OCI spec must be a JSON object")
    return spec


# -- helpers -----------------------------------------------------------------------


def _string_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"image config {what} must be a list of strings")
    return list(value)


def _is_id(text: str) -> bool:
    return text.isdigit() and text.isascii() and int(text) <= MAX_ID


def _parse_id(text: str, what: str) -> int:
    if not _is_id(text):
        raise InvalidArgument(f"invalid {what} {text!r} in the image's user database")
    return int(text)


def _find(entries: list[list[str]] | None, match: Any) -> list[str] | None:
    for entry in entries or []:
        if match(entry):
            return entry
    return None


def _read_db(rootfs: str, path: str) -> list[list[str]] | None:
    """Entries of a colon-separated database (passwd/group) inside rootfs; None if absent."""
    try:
        fd = open_in_root(rootfs, path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as fh:
        text = fh.read(4 * 1024 * 1024)
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        # passwd has 7 fields, group 4; pad so short lines do not raise.
        entries.append(fields + [""] * (7 - len(fields)))
    return entries


def open_in_root(root: str, path: str) -> int:
    """Open `path` read-only as seen from inside `root`: symlinks and '..' never leave it."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _walk(root_fd, path)
    finally:
        os.close(root_fd)


def _walk(root_fd: int, path: str) -> int:
    parts = [p for p in path.split("/") if p and p != "."]
    stack = [os.dup(root_fd)]  # fds of the directories from root down
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                target = os.readlink(name, dir_fd=stack[-1])
            except OSError:
                target = None
            if target is not None:
                links += 1
                if links > _MAX_SYMLINKS:
                    raise InvalidArgument(f"too many symlinks resolving {path!r}")
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
            if parts:
                flags |= os.O_DIRECTORY
            fd = os.open(name, flags, dir_fd=stack[-1])
            if not parts:
                return fd
            stack.append(fd)
        raise InvalidArgument(f"{path!r} names a directory, not a file")
    finally:
        for fd in stack:
            os.close(fd)
