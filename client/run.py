"""`moorctl run` and `tasks start`: the same calls, in the same order, as `ctr run --rm`.

Images.Get -> manifest/config -> Leases.Create -> Snapshots.Prepare(id, chainID) ->
(a read-only mount of the snapshot when a user must be looked up in the image's
/etc/passwd and /etc/group) -> Containers.Create -> Leases.Delete -> FIFOs (stdin, stdout, stderr; no stderr with a
terminal) -> Tasks.Create -> Tasks.Wait (in a thread, before Start) -> ResizePty (with a
terminal) -> Tasks.Start -> relay stdio (client/terminal.py) -> Tasks.Delete ->
Snapshots.Remove -> Containers.Delete.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

from moord.bus.client import Client
from moord.client.images import resolve
from moord.client.terminal import FifoSet, Session, remove_fifo_dir
from moord.messages.errors import FailedPrecondition, InvalidArgument, MoordError, NotFound

T = TypeVar("T")

DEFAULT_RUNTIME = "io.containerd.runc.v2"


class RunOptions(NamedTuple):
    """What the user asked `moorctl run` for (a NamedTuple: dataclasses costs start-up)."""

    image: str
    container_id: str
    args: Sequence[str]
    env: Sequence[str] = ()
    remove: bool = True
    detach: bool = False
    tty: bool = False
    cwd: str = ""
    user: str = ""
    hostname: str = ""
    read_only: bool = False
    mounts: Sequence[dict[str, Any]] = ()
    memory_limit: int = 0
    cpus: float = 0.0
    pids_limit: int = 0
    privileged: bool = False
    net_host: bool = False
    seccomp: bool = False
    seccomp_profile: dict[str, Any] | None = None
    snapshotter: str = "overlayfs"
    runtime: str = DEFAULT_RUNTIME
    runtime_binary: str = ""
    null_io: bool = False
    log_uri: str = ""
    fifo_root: str = "/run/moord/fifo"


class TaskIO:
    """How a task's stdio is wired: FIFOs to this terminal, a log URI, or nothing."""

    def __init__(
        self, tty: bool = False, detach: bool = False, null_io: bool = False, log_uri: str = "", fifo_root: str = "/run/moord/fifo"
    ) -> None:
        self.tty = tty
        self.detach = detach
        self.null_io = null_io
        self.log_uri = log_uri
        self.fifo_root = fifo_root
        if self.tty and (self.null_io or self.log_uri):
            raise InvalidArgument("a terminal cannot be used with null IO or a log URI")
        if self.null_io and self.log_uri:
            raise InvalidArgument("null IO and a log URI cannot be used together")
        if self.log_uri and not self.log_uri.startswith("file:///"):
            raise InvalidArgument(f"log URI {self.log_uri!r}: only file:///absolute/path is supported")

    def fifos(self, name: str) -> FifoSet | None:
        """FIFOs for the process (None: null IO or a log URI).

        Detached, only a terminal keeps FIFOs (for `tasks attach`); plain stdio is not
        wired: a FIFO nobody reads would stop (or, with runc's pass-through, kill) a
        detached writer.
        """
        if self.null_io or self.log_uri or (self.detach and not self.tty):
            return None
        # With a terminal the pty merges stdout and stderr: no stderr FIFO (as ctr).
        return FifoSet.create(self.fifo_root, name, stdin=True, stderr=not self.tty)

    def paths(self, fifos: FifoSet | None) -> dict[str, str]:
        """stdin/stdout/stderr for Tasks.Create or Exec."""
        if fifos is not None:
            return fifos.paths()
        if self.log_uri:
            return {"stdin": "", "stdout": self.log_uri, "stderr": self.log_uri}
        return {"stdin": "", "stdout": "", "stderr": ""}


def parse_mount(text: str) -> dict[str, Any]:
    """ctr's --mount: `type=bind,src=/host,dst=/in,options=rbind:ro` -> an OCI mount."""
    mount: dict[str, Any] = {"type": "", "source": "", "destination": "", "options": []}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"invalid mount {text!r}: expected key=value pairs")
        if key == "type":
            mount["type"] = value
        elif key in ("source", "src"):
            mount["source"] = value
        elif key in ("destination", "dst", "target"):
            mount["destination"] = value
        elif key == "options":
            mount["options"] = [o for o in value.split(":") if o]
        else:
            raise InvalidArgument(f"mount option {key!r} not supported")
    if not mount["destination"].startswith("/"):
        raise InvalidArgument(f"mount {text!r}: dst must be an absolute path")
    if not mount["type"]:
        mount["type"] = "bind" if mount["source"].startswith("/") else ""
    if not mount["type"]:
        raise InvalidArgument(f"mount {text!r}: type is required")
    if mount["type"] == "bind":
        if not mount["source"].startswith("/"):
            raise InvalidArgument(f"bind mount {text!r}: src must be an absolute host path")
        if not {"bind", "rbind"} & set(mount["options"]):
            mount["options"].insert(0, "rbind")
    return mount


def build_spec(opts: RunOptions, namespace: str, image_config: dict[str, Any], rootfs: str | None = None) -> bytes:
    """The OCI runtime spec (JSON) for the container, from image config and options.

    `rootfs` is the image's root filesystem, mounted, for user and group names.
    """
    from moord.oci import spec

    built = spec.build_spec(
        namespace,
        opts.container_id,
        image_config,
        args=list(opts.args),
        env=list(opts.env),
        cwd=opts.cwd,
        user=opts.user,
        rootfs=rootfs,
        tty=opts.tty,
        hostname=opts.hostname,
        readonly_rootfs=opts.read_only,
        memory_limit=opts.memory_limit,
        cpus=opts.cpus,
        pids_limit=opts.pids_limit,
        mounts=list(opts.mounts),
        privileged=opts.privileged,
        net_host=opts.net_host,
        seccomp=opts.seccomp,
        seccomp_profile=opts.seccomp_profile,
    )
    return spec.dumps(built)


def needs_image_users(user: str) -> bool:
    """Whether resolving `user` reads the image's /etc/passwd or /etc/group.

    A name does, and so does a bare uid (its gid and groups come from /etc/passwd and
    /etc/group, as containerd's WithUserID + WithAdditionalGIDs). "uid:gid" and the
    default root do not: skipping the mount keeps `run` fast. containerd also reads
    root's supplementary groups from /etc/group; moord gives root only gid 0.
    """
    if not user:
        return False
    name, sep, group = user.partition(":")
    return not (sep and name.isdigit() and group.isdigit())


def readonly_mounts(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The snapshot's mounts made read-only (containerd's readonlyMounts): an overlay loses
    its upperdir and workdir (the upper layer joins the lower ones); others get "ro"."""
    result = []
    for m in mounts:
        options = list(m.get("options") or [])
        if m.get("type") == "overlay":
            upper = next((o[len("upperdir="):] for o in options if o.startswith("upperdir=")), "")
            options = [o for o in options if not o.startswith(("upperdir=", "workdir="))]
            if upper:
                options = ["lowerdir=" + upper + ":" + o[len("lowerdir="):] if o.startswith("lowerdir=") else o for o in options]
        else:
            options = [o for o in options if o not in ("ro", "rw")] + ["ro"]
        result.append({**m, "options": options})
    return result


def in_image_rootfs(mounts: list[dict[str, Any]], use: Callable[[str], T]) -> T:
    """Call `use(path)` with the snapshot mounted read-only at `path` (ctr's temporary mount).

    The mount lives in a private mount namespace of a helper thread: nobody else sees it,
    and it vanishes with the thread, so even a moorctl killed mid-way leaves no mount.
    """
    import ctypes
    import tempfile
    import threading

    from moord.linux import mount as mounting
    from moord.linux.libc import libc

    clone_newns = 0x00020000
    target = tempfile.mkdtemp(prefix="moorctl-rootfs-")
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            # CLONE_NEWNS gives this thread alone a copy of the mount table.
            if libc.unshare(clone_newns) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"unshare(CLONE_NEWNS): {os.strerror(code)}")
            # Private first: a mount under a shared / would propagate to the host's table.
            if libc.mount(None, b"/", None, mounting.MS_REC | mounting.MS_PRIVATE, None) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"making / private: {os.strerror(code)}")
            mounting.mount_all(readonly_mounts(mounts), target)
            outcome["value"] = use(target)
        except BaseException as exc:  # handed to the calling thread
            outcome["error"] = exc

    try:
        worker = threading.Thread(target=work, name="image-rootfs", daemon=True)
        worker.start()
        worker.join()
    finally:
        os.rmdir(target)
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, OSError):
            raise FailedPrecondition(f"cannot mount the image's root filesystem to read its users: {error}") from None
        raise error
    return outcome["value"]


def run(client: Client, opts: RunOptions) -> int:
    """Run a container to completion (or start it detached); returns its exit status."""
    if opts.remove and opts.detach:
        raise InvalidArgument("--detach and --rm cannot be used together")
    task_io = TaskIO(tty=opts.tty, detach=opts.detach, null_io=opts.null_io, log_uri=opts.log_uri, fifo_root=opts.fifo_root)
    image = resolve(client, opts.image)
    runtime: dict[str, Any] = {"name": opts.runtime}
    if opts.runtime_binary:
        runtime["options"] = {"binary_name": opts.runtime_binary}
    # As ctr: the snapshot is leased until the container record references it.
    with client.temporary_lease() as lease:
        mounts = client.call(
            "snapshots.prepare",
            {"snapshotter": opts.snapshotter, "key": opts.container_id, "parent": image.chain_id},
            lease=lease,
        )["mounts"]
        try:
            from moord.oci.spec import image_config_section

            if needs_image_users(opts.user or str(image_config_section(image.config).get("User") or "")):
                spec = in_image_rootfs(mounts, lambda root: build_spec(opts, client.namespace, image.config, root))
            else:
                spec = build_spec(opts, client.namespace, image.config)
            container = {
                "id": opts.container_id,
                "image": opts.image,
                "runtime": runtime,
                "spec": spec,
                "snapshotter": opts.snapshotter,
                "snapshot_key": opts.container_id,
            }
            client.call("containers.create", {"container": container}, lease=lease)
        except BaseException:
            _call_quietly(client, "snapshots.remove", {"snapshotter": opts.snapshotter, "key": opts.container_id})
            raise
    finished = False
    try:
        status = run_task(client, opts.container_id, mounts, task_io)
        finished = True
        return status
    finally:
        # Without --rm a finished run keeps its container and snapshot (as ctr does);
        # a failed one takes back everything it created. ctr's order: snapshot, then record.
        if opts.remove or not finished:
            _call_quietly(client, "snapshots.remove", {"snapshotter": opts.snapshotter, "key": opts.container_id})
            _call_quietly(client, "containers.delete", {"id": opts.container_id})


def _call_quietly(client: Client, kind: str, payload: dict[str, Any]) -> None:
    try:
        client.call(kind, payload)
    except NotFound:
        pass


def run_task(client: Client, container_id: str, rootfs: list[dict[str, Any]], task_io: TaskIO) -> int:
    """Create and start a container's task, then (unless detached) relay its stdio until it
    exits and delete it. Returns its exit status (0 when detached)."""
    fifos = task_io.fifos(container_id)
    created = False
    keep_fifos = False
    try:
        client.call(
            "tasks.create",
            {"container_id": container_id, "rootfs": rootfs, "terminal": task_io.tty, **task_io.paths(fifos)},
        )
        created = True
        if task_io.detach:
            client.call("tasks.start", {"container_id": container_id})
            keep_fifos = fifos is not None  # `tasks attach` reopens them; `tasks rm` removes them
            return 0
        start = lambda: client.call("tasks.start", {"container_id": container_id})  # noqa: E731
        if fifos is None:
            # No stdio to relay: just wait (Wait still comes before Start).
            fifos = FifoSet()
        status = Session(client, container_id, fifos, tty=task_io.tty).run(start)
        client.call("tasks.delete", {"container_id": container_id})
        created = False
        return status
    finally:
        if fifos is not None:
            fifos.close(remove=not keep_fifos)
        if created and not task_io.detach:
            discard_task(client, container_id)


def discard_task(client: Client, container_id: str, exec_id: str = "") -> None:
    """After a failure: kill the process if it runs, and delete it (best effort, errors ignored)."""
    ids = {"container_id": container_id, "exec_id": exec_id}
    for kind, payload, timeout in (
        ("tasks.kill", {**ids, "signal": 9}, 5.0),
        ("tasks.wait", ids, 10.0),
        ("tasks.delete", ids, 10.0),
    ):
        try:
            client.call(kind, payload, timeout=timeout)
        except (MoordError, OSError):
            pass


def delete_task(client: Client, container_id: str, fifo_root: str, exec_id: str = "") -> dict[str, Any]:
    """Tasks.Delete, then remove the FIFO dir moorctl made for the process (as ctr's Delete closes its IO)."""
    ids = {"container_id": container_id, "exec_id": exec_id}
    try:
        process = client.call("tasks.get", ids)["process"]
    except NotFound:
        process = {}
    reply = client.call("tasks.delete", ids)
    remove_fifo_dir(fifo_root, [process.get("stdin", ""), process.get("stdout", ""), process.get("stderr", "")])
    return reply
