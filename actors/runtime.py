"""The runtime subsystem: tasks.* served by one actor that drives one moord-shim per task.

The actor writes the bundle and has its zygote fork a detached shim that creates the
task at once (runc create, binding its endpoint meanwhile) and reports the outcome with
its pid; it then calls the shim for start/kill/delete (each a short runc run). It never waits for a container exit on
its own thread: a monitor thread holds a DEALER socket to every shim with one pending
shim.wait, plus the shim's pidfd. A wait reply becomes an exit notice; a pidfd that
fires without one means the shim died, and the task is reported stopped with status 255
after its runc container and rootfs mount are cleaned up. Notices reach the actor as
pykka messages, so all task state is touched by the actor thread only.

On start the actor re-attaches to every shim found in the bundles dir, probing them in
parallel with a short deadline; exits that happened meanwhile are read from the shims
(or their exit files).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from moord.actors.base import DEFERRED, CallContext, ServiceActor, handles
from moord.bus.client import Client
from moord.bus.events import EventPublisher
from moord.config.model import Config
from moord.linux.mount import is_mountpoint, unmount_all
from moord.messages import envelope as codec
from moord.messages.base import Empty, validate_identifier
from moord.messages.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MoordError,
    NotFound,
    Unavailable,
    Unimplemented,
    error_from_wire,
)
from moord.messages.events import (
    TaskCheckpointed,
    TaskCreate,
    TaskDelete,
    TaskExecAdded,
    TaskExecStarted,
    TaskExit,
    TaskPaused,
    TaskResumed,
    TaskStart,
)
from moord.messages.shim import ShimCreate
from moord.messages.tasks import (
    UNKNOWN_EXIT_STATUS,
    CheckpointTask,
    CheckpointTaskReply,
    CloseIO,
    CreateTask,
    CreateTaskReply,
    DeleteTask,
    DeleteTaskReply,
    ExecProcess,
    GetTask,
    KillTask,
    ListPids,
    ListTasks,
    MetricsReply,
    PauseTask,
    PidReply,
    PidsReply,
    Process,
    ProcessList,
    ProcessReply,
    ResizePty,
    ResumeTask,
    StartTask,
    TaskMetrics,
    UpdateTask,
    WaitReply,
    WaitTask,
)
from moord.oci.spec import cgroups_path, loads as load_spec
from moord.linux.files import read_small, write_atomic
from moord.shims import cgroups
from moord.shims.shim import (
    ADDRESS_FILE,
    BUNDLES_DIR,
    CONFIG_FILE,
    CRIU_DUMP_LOG,
    CRIU_RESTORE_LOG,
    EXEC_FILE_PREFIX,
    INIT_PID_FILE,
    ROOTFS_DIR,
    RUNTIME_FILE,
    SHIM_PID_FILE,
    TITLE_PREFIX,
    ShimConfig,
    address_to_path,
    bundle_path,
    first_criu_error,
    read_exit,
    runtime_command,
    runtime_name,
    runtime_root,
    spec_cgroups_path,
    write_exit,
)
from moord.shims.zygote import Zygote

log = logging.getLogger(__name__)

SHIM_CALL_TIMEOUT = 30.0  # runc create of a big spec can take a while
REATTACH_TIMEOUT = 1.0  # a live shim answers state in milliseconds; fail fast otherwise
RUNC_TIMEOUT = 30.0
# Files a bundle may hold; removal deletes only these (never walks into rootfs).
BUNDLE_FILES = (
    "config.json", "address", "shim.pid", "init.pid", "exit", "log.json", "shim.log", RUNTIME_FILE,
    CRIU_DUMP_LOG, CRIU_RESTORE_LOG,
)  # fmt: skip
CRIU_CHECK_TIMEOUT = 30.0
CHECKPOINTS_DIR = "checkpoints"  # under the root: where a checkpoint without a path goes
# runc checkpoint/restore can take long for a big container (CRIU writes all its memory).
CHECKPOINT_TIMEOUT = 120.0
# Runtime names (containerd's runtime field) that select crun rather than the default.
CRUN_RUNTIME_NAMES = ("crun", "io.containerd.crun.v2", "io.containerd.crun.v1")

Key = tuple[str, str]


def process_view(container_id: str, process_id: str, proc: Any) -> Process:
    """A task's init or exec'd process (anything with pid, status, stdio, exit fields) as
    the tasks API shows it."""
    return Process(
        container_id=container_id,
        id=process_id,
        pid=proc.pid,
        status=proc.status,
        stdin=proc.stdin,
        stdout=proc.stdout,
        stderr=proc.stderr,
        terminal=proc.terminal,
        exit_status=proc.exit_status,
        exited_at=proc.exited_at,
    )


@dataclass
class ExecState:
    """An exec'd process of a task."""

    exec_id: str
    pid: int = 0
    status: str = "created"
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: float = 0.0
    waiters: list[CallContext] = field(default_factory=list)

    def process(self, container_id: str) -> Process:
        """The exec'd process as the tasks API shows it."""
        return process_view(container_id, self.exec_id, self)


@dataclass
class Task:
    """What the runtime knows of one task (the init process of a container) and its execs."""

    namespace: str
    container_id: str
    bundle: str
    address: str
    shim_pid: int
    pid: int = 0
    status: str = "created"
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: float = 0.0
    shim_alive: bool = True
    waiters: list[CallContext] = field(default_factory=list)
    connection: ShimConnection | None = None
    runtime: str = "runc"
    cgroups_path: str = ""
    execs: dict[str, ExecState] = field(default_factory=dict)

    def call(self, kind: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Call this task's shim (from the actor thread)."""
        if self.connection is None:
            self.connection = ShimConnection(self.address, self.namespace)
        return self.connection.call(kind, payload, timeout)

    def disconnect(self) -> None:
        """Drop the connection to the shim."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    @property
    def key(self) -> Key:
        """(namespace, id)."""
        return (self.namespace, self.container_id)

    def process(self) -> Process:
        """The task (its init process) as the tasks API shows it."""
        return process_view(self.container_id, self.container_id, self)


@dataclass
class ShimExited:
    """Notice from the monitor: the shim answered shim.wait."""

    key: Key
    exit_status: int
    exited_at: float


@dataclass
class ExecExited:
    """Notice from the monitor: the shim answered shim.wait for an exec'd process."""

    key: Key
    exec_id: str
    exit_status: int
    exited_at: float


@dataclass
class ShimGone:
    """Notice from the monitor: the shim process ended without reporting an exit."""

    key: Key


def shim_is_alive(pid: int, namespace: str, container_id: str) -> bool:
    """Whether `pid` is the live shim of that task (its title names it; pids get reused)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read(4096)
    except OSError:
        return False
    title = f"{TITLE_PREFIX}{namespace}/{container_id}".encode()
    return cmdline.split(b"\0", 1)[0].rstrip() == title


# -- calling a shim ------------------------------------------------------------------------


class ShimConnection:
    """A DEALER to one shim, owned by one thread and closed with its task.

    Not bus.Client: Client caches a socket per endpoint for ever (one per shim ever
    started would pile up), and its ZMQ_IMMEDIATE drops a reply still unread when the
    peer disconnects, which is exactly what a shim does right after answering
    shim.delete. Without IMMEDIATE the reply stays readable after the shim is gone.
    """

    def __init__(self, path: str, namespace: str, context: zmq.Context | None = None) -> None:
        self.path = path
        self.namespace = namespace
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"ipc://{path}")
        self._prefix = f"rt-{os.getpid()}-{id(self):x}-"
        self._count = 0

    def call(self, kind: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request; a typed error is raised, silence past `timeout` is DeadlineExceeded."""
        if not os.path.exists(self.path):
            raise Unavailable(f"{kind}: nothing listens at {self.path}")
        self._count += 1
        request_id = f"{self._prefix}{self._count}"
        deadline = time.time() + timeout
        self._sock.send(codec.request_frame(request_id, kind, payload, self.namespace, deadline))
        while True:
            remaining = deadline - time.time()
            if remaining <= 0 or not self._sock.poll(max(1, int(remaining * 1000))):
                raise DeadlineExceeded(f"{kind}: no reply from the shim at {self.path} within {timeout:.1f}s")
            reply = codec.unpack(self._sock.recv_multipart()[0])
            if not isinstance(reply, dict) or reply.get("id") != request_id:
                continue  # a late answer to an earlier call that timed out
            if reply.get("kind") == codec.ERROR:
                raise error_from_wire(reply.get("payload"))
            body = reply.get("payload")
            return body if isinstance(body, dict) else {}

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(linger=0)


# -- the monitor thread -------------------------------------------------------------------


@dataclass
class _Watch:
    key: Key
    sock: zmq.Socket
    pidfd: int
    request_id: str
    exec_waits: dict[str, str] = field(default_factory=dict)  # request id -> exec id


class ShimMonitor:
    """One thread watching every shim: a DEALER with one pending shim.wait, and a pidfd."""

    def __init__(self, notify: Callable[[Any], None], context: zmq.Context | None = None) -> None:
        self._notify = notify
        self._context = context or zmq.Context.instance()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="runtime-shim-monitor", daemon=True)
        self._stopping = False

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every socket and pidfd."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(5)
        os.close(self._wake)

    def watch(self, key: Key, socket_path: str, shim_pid: int) -> None:
        """Learn the exit of the task behind this shim (or the shim's death)."""
        try:
            pidfd = os.pidfd_open(shim_pid)
        except ProcessLookupError:
            self._notify(ShimGone(key))
            return
        self._command("watch", (key, socket_path, pidfd))

    def unwatch(self, key: Key) -> None:
        """Stop watching (before a deliberate shim.delete)."""
        self._command("unwatch", key)

    def watch_exec(self, key: Key, exec_id: str) -> None:
        """Learn the exit of an exec'd process of a watched task."""
        self._command("watch_exec", (key, exec_id))

    def _command(self, op: str, arg: Any) -> None:
        self._commands.put((op, arg))
        os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake, zmq.POLLIN)
        watches: dict[Key, _Watch] = {}
        by_sock: dict[zmq.Socket, Key] = {}
        by_fd: dict[int, Key] = {}

        def drop(key: Key) -> None:
            watch = watches.pop(key, None)
            if watch is None:
                return
            poller.unregister(watch.sock)
            poller.unregister(watch.pidfd)
            by_sock.pop(watch.sock, None)
            by_fd.pop(watch.pidfd, None)
            watch.sock.close(linger=0)
            os.close(watch.pidfd)

        def take_reply(watch: _Watch) -> bool:
            """Read the shim's answers; True once the wait was answered."""
            while True:
                try:
                    parts = watch.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return False
                try:
                    reply = codec.unpack(parts[0])
                except MoordError:
                    continue
                if not isinstance(reply, dict):
                    continue
                body = reply.get("payload") or {}
                exec_id = watch.exec_waits.pop(str(reply.get("id")), None)
                if exec_id is not None:
                    if reply.get("kind") == codec.ERROR:
                        log.warning("shim %s/%s refused wait for %s: %s", *watch.key, exec_id, body)
                        continue
                    self._notify(
                        ExecExited(watch.key, exec_id, int(body.get("exit_status", 0)), float(body.get("exited_at", 0.0)))
                    )
                    continue
                if reply.get("id") != watch.request_id:
                    continue
                if reply.get("kind") == codec.ERROR:
                    log.warning("shim %s/%s refused wait: %s", *watch.key, body)
                    return False
                self._notify(ShimExited(watch.key, int(body.get("exit_status", 0)), float(body.get("exited_at", 0.0))))
                return True

        try:
            while not self._stopping:
                for item, _ in poller.poll(1000):
                    if item == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                        while True:
                            try:
                                op, arg = self._commands.get_nowait()
                            except queue.Empty:
                                break
                            if op == "watch":
                                key, path, pidfd = arg
                                drop(key)
                                sock = self._context.socket(zmq.DEALER)
                                sock.setsockopt(zmq.LINGER, 0)
                                sock.connect(f"ipc://{path}")
                                request_id = f"wait-{os.getpid()}-{key[0]}/{key[1]}-{time.monotonic_ns()}"
                                sock.send(codec.request_frame(request_id, "shim.wait", {}, key[0], 0.0))
                                watches[key] = _Watch(key, sock, pidfd, request_id)
                                by_sock[sock] = key
                                by_fd[pidfd] = key
                                poller.register(sock, zmq.POLLIN)
                                poller.register(pidfd, zmq.POLLIN)
                            elif op == "unwatch":
                                drop(arg)
                            elif op == "watch_exec":
                                key, exec_id = arg
                                watch = watches.get(key)
                                if watch is None:
                                    continue  # its shim is gone: ShimGone covers the execs too
                                request_id = f"wait-{os.getpid()}-{key[0]}/{key[1]}/{exec_id}-{time.monotonic_ns()}"
                                payload = {"exec_id": exec_id}
                                watch.sock.send(codec.request_frame(request_id, "shim.wait", payload, key[0], 0.0))
                                watch.exec_waits[request_id] = exec_id
                    elif isinstance(item, int):
                        key = by_fd.get(item)
                        if key is None:
                            continue
                        watch = watches[key]
                        # The shim ended; its answer may still sit in our socket.
                        time.sleep(0.01)
                        if not take_reply(watch):
                            self._notify(ShimGone(key))
                        drop(key)
                    else:
                        key = by_sock.get(item)
                        if key is not None and take_reply(watches[key]):
                            drop(key)
        finally:
            for key in list(watches):
                drop(key)


# -- the actor --------------------------------------------------------------------------


@dataclass
class _Probe:
    namespace: str
    container_id: str
    bundle: str
    shim_pid: int
    address: str
    state: dict[str, Any] | None


class RuntimeActor(ServiceActor):
    """Serves tasks.*: one shim per task, exits learnt asynchronously, re-attach on start."""

    def __init__(self, config: Config, client: Client, events: EventPublisher) -> None:
        super().__init__()
        self.config = config
        self.client = client
        self.events = events
        self.runtime = config.plugins.runtime.binary
        self.tasks: dict[Key, Task] = {}
        self.zygote = Zygote()
        self.monitor: ShimMonitor | None = None
        self.criu_checks: dict[str, str] = {}  # criu binary -> `criu check`'s first error ("" = works)

    # -- lifecycle ------------------------------------------------------------------

    def on_start(self) -> None:
        """Start the zygote and the monitor, then re-attach to the shims that survived us."""
        os.makedirs(os.path.join(self.config.state, BUNDLES_DIR), mode=0o711, exist_ok=True)
        self.monitor = ShimMonitor(self.actor_ref.tell)
        self.monitor.start()
        self._reattach()  # first: running tasks matter more than the next create
        self.zygote.start()

    def on_stop(self) -> None:
        """Leave the shims running; stop our threads and the zygote."""
        for task in self.tasks.values():
            task.disconnect()
            for waited in [task, *task.execs.values()]:
                for ctx in waited.waiters:
                    ctx.fail(Unavailable("the runtime is stopping; wait again after it restarts"))
                waited.waiters.clear()
        if self.monitor is not None:
            self.monitor.stop()
        self.zygote.stop()
        self.client.close()

    def on_other(self, message: Any) -> Any:
        """Notices from the monitor thread."""
        if isinstance(message, ShimExited):
            task = self.tasks.get(message.key)
            if task is not None and task.status != "stopped":
                self._stopped(task, message.exit_status, message.exited_at)
        elif isinstance(message, ExecExited):
            task = self.tasks.get(message.key)
            proc = task.execs.get(message.exec_id) if task is not None else None
            if proc is not None and proc.status != "stopped":
                self._exec_stopped(proc, message.exit_status, message.exited_at)
        elif isinstance(message, ShimGone):
            task = self.tasks.get(message.key)
            if task is not None:
                self._shim_gone(task)
        else:
            super().on_other(message)
        return None

    # -- handlers -------------------------------------------------------------------

    @handles("tasks.create")
    def create(self, request: CreateTask, ctx: CallContext) -> CreateTaskReply:
        """Write the bundle, start the task's shim, and runc create the container."""
        ns, cid = ctx.namespace, request.container_id
        if (ns, cid) in self.tasks:
            raise AlreadyExists(f"task {cid}: already exists")
        if request.checkpoint:
            self._require_criu("restore")
            if not _clean_absolute(request.checkpoint) or not os.path.isdir(request.checkpoint):
                raise InvalidArgument(f"checkpoint {request.checkpoint!r} is not an absolute directory")
        bundle = bundle_path(self.config.state, ns, cid)
        if os.path.lexists(bundle):
            raise AlreadyExists(f"task {cid}: a bundle exists already at {bundle}")
        container = self.client.call("containers.get", {"id": cid}, namespace=ns)["container"]
        binary = self._runtime_binary(container.get("runtime") or {}, request.options)
        spec = self._task_spec(ns, cid, container.get("spec") or b"", bool(request.rootfs))
        process = spec.get("process")
        if isinstance(process, dict):
            process["terminal"] = request.terminal  # the runtime refuses a mismatch with the console socket
        os.makedirs(os.path.join(bundle, ROOTFS_DIR), mode=0o711)
        # Not fsynced: a bundle lost in a crash belongs to a task that never started.
        write_atomic(os.path.join(bundle, CONFIG_FILE), json.dumps(spec).encode(), 0o644, durable=False)
        write_atomic(os.path.join(bundle, RUNTIME_FILE), binary.encode(), 0o644, durable=False)
        shim_config = ShimConfig(
            namespace=ns,
            container_id=cid,
            state=self.config.state,
            runtime=binary,
            ipc_dir=self.config.ipc_dir,
            debug=self.config.plugins.runtime.shim_debug,
        )
        task = Task(ns, cid, bundle, shim_config.socket_path, 0, runtime=binary)
        task.cgroups_path = str(spec.get("linux", {}).get("cgroupsPath", ""))
        shim_request = ShimCreate(
            rootfs=request.rootfs,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            terminal=request.terminal,
            checkpoint=request.checkpoint,
        )
        try:
            # The shim runs shim.create as soon as it has its config (binding while runc
            # works) and reports the outcome with its pid: no separate round trip.
            spawned = self.zygote.spawn(shim_config, create=shim_request.model_dump())
            log.debug("shim %s/%s created its task in %.1f ms", ns, cid, spawned.ready_ms)
            task.shim_pid = spawned.pid
            if spawned.create_error is not None:
                raise error_from_wire(spawned.create_error)
            if spawned.created is None:
                raise Internal(f"the shim of task {cid} reported no create")
            reply = spawned.created
        except BaseException:
            if task.shim_pid:
                self._dispose_shim(task)
            else:  # the shim died during its create: what it may have left behind
                self._cleanup_runtime(task)
            self._remove_bundle(bundle)
            raise
        task.pid = int(reply["pid"])
        task.stdin, task.stdout, task.stderr, task.terminal = request.stdin, request.stdout, request.stderr, request.terminal
        # Connect now: ZeroMQ's handshake then runs while the reply travels, not in tasks.start.
        task.connection = ShimConnection(task.address, task.namespace)
        self.tasks[task.key] = task
        assert self.monitor is not None
        self.monitor.watch(task.key, task.address, task.shim_pid)
        self.events.publish(
            "/tasks/create",
            ns,
            TaskCreate(
                container_id=cid,
                bundle=bundle,
                rootfs=request.rootfs,
                io={"stdin": request.stdin, "stdout": request.stdout, "stderr": request.stderr, "terminal": request.terminal},
                checkpoint=request.checkpoint,
                pid=task.pid,
            ),
        )
        return CreateTaskReply(container_id=cid, pid=task.pid)

    @handles("tasks.start")
    def start_task(self, request: StartTask, ctx: CallContext) -> PidReply:
        """Start a created task."""
        task = self._task(ctx.namespace, request.container_id)
        if request.exec_id:
            proc = self._exec(task, request.exec_id)
            if proc.status != "created":
                raise FailedPrecondition(f"process {proc.exec_id} is {proc.status}, not created")
            reply = self._shim_call(task, "shim.start", {"exec_id": proc.exec_id})
            proc.pid, proc.status = int(reply["pid"]), "running"
            assert self.monitor is not None
            self.monitor.watch_exec(task.key, proc.exec_id)
            self.events.publish(
                "/tasks/exec-started",
                task.namespace,
                TaskExecStarted(container_id=task.container_id, exec_id=proc.exec_id, pid=proc.pid),
            )
            return PidReply(pid=proc.pid)
        if task.status != "created":
            raise FailedPrecondition(f"task {task.container_id} is {task.status}, not created")
        reply = self._shim_call(task, "shim.start", {}, timeout=CHECKPOINT_TIMEOUT)
        task.pid = int(reply["pid"]) or task.pid  # a restored task gets its pid only now
        task.status = "running"
        self.events.publish("/tasks/start", task.namespace, TaskStart(container_id=task.container_id, pid=task.pid))
        return PidReply(pid=task.pid)

    @handles("tasks.wait")
    def wait(self, request: WaitTask, ctx: CallContext) -> Any:
        """Answer when the task has exited (now if it has); never blocks the actor."""
        task = self._task(ctx.namespace, request.container_id)
        waited: Task | ExecState = self._exec(task, request.exec_id) if request.exec_id else task
        if waited.status == "stopped":
            return WaitReply(exit_status=waited.exit_status, exited_at=waited.exited_at)
        waited.waiters = [w for w in waited.waiters if not w.expired()]
        waited.waiters.append(ctx)
        return DEFERRED

    @handles("tasks.kill")
    def kill(self, request: KillTask, ctx: CallContext) -> Empty:
        """Signal the task's init (or all its processes)."""
        task = self._task(ctx.namespace, request.container_id)
        if request.exec_id:
            proc = self._exec(task, request.exec_id)
            if not task.shim_alive or proc.status == "stopped":
                raise NotFound(f"process {proc.exec_id} already finished")
        elif not task.shim_alive or (task.status == "stopped" and not request.all):
            raise NotFound(f"process {task.pid} already finished")
        self._shim_call(task, "shim.kill", {"exec_id": request.exec_id, "signal": request.signal, "all": request.all})
        return Empty()

    @handles("tasks.get")
    def get(self, request: GetTask, ctx: CallContext) -> ProcessReply:
        """A task's state."""
        task = self._task(ctx.namespace, request.container_id)
        if request.exec_id:
            return ProcessReply(process=self._exec(task, request.exec_id).process(task.container_id))
        return ProcessReply(process=task.process())

    @handles("tasks.list")
    def list_tasks(self, request: ListTasks, ctx: CallContext) -> ProcessList:
        """The tasks of the caller's namespace."""
        if request.filter:
            raise Unimplemented("task filters are not supported yet")
        tasks = [t.process() for (ns, _), t in sorted(self.tasks.items()) if ns == ctx.namespace]
        return ProcessList(tasks=tasks)

    @handles("tasks.delete")
    def delete(self, request: DeleteTask, ctx: CallContext) -> DeleteTaskReply:
        """Delete a created or stopped task: the shim removes runc's state and the mount, then exits."""
        task = self._task(ctx.namespace, request.container_id)
        if request.exec_id:
            return self._delete_exec(task, request.exec_id)
        if task.status in ("running", "paused"):
            raise FailedPrecondition(f"task {task.container_id} must be stopped before deletion")
        assert self.monitor is not None
        self.monitor.unwatch(task.key)
        shim_cleaned_up = False
        if task.shim_alive:
            try:
                reply = self._shim_call(task, "shim.delete", {})
            except (Unavailable, DeadlineExceeded):
                self._dispose_shim(task)
            else:
                shim_cleaned_up = True
                if task.status != "stopped":
                    self._stopped(task, int(reply["exit_status"]), float(reply["exited_at"]))
            task.shim_alive = False
        task.disconnect()
        if not shim_cleaned_up:  # the shim's own delete already ran runc delete and unmounted
            self._cleanup_runtime(task)
        self._remove_bundle(task.bundle)
        del self.tasks[task.key]
        self.events.publish(
            "/tasks/delete",
            task.namespace,
            TaskDelete(
                container_id=task.container_id,
                id=task.container_id,
                pid=task.pid,
                exit_status=task.exit_status,
                exited_at=task.exited_at,
            ),
        )
        return DeleteTaskReply(id=task.container_id, pid=task.pid, exit_status=task.exit_status, exited_at=task.exited_at)

    def _delete_exec(self, task: Task, exec_id: str) -> DeleteTaskReply:
        proc = self._exec(task, exec_id)
        if proc.status == "running":
            raise FailedPrecondition(f"process {exec_id} must be stopped before deletion")
        if task.shim_alive:
            try:
                self._shim_call(task, "shim.delete", {"exec_id": exec_id})
            except NotFound:
                pass  # the shim restarted its bookkeeping or never had it: nothing to free
        del task.execs[exec_id]
        return DeleteTaskReply(id=exec_id, pid=proc.pid, exit_status=proc.exit_status, exited_at=proc.exited_at)

    @handles("tasks.exec")
    def exec_process(self, request: ExecProcess, ctx: CallContext) -> Empty:
        """Add a process to a running task; tasks.start with its exec_id runs it."""
        task = self._task(ctx.namespace, request.container_id)
        if task.status not in ("running", "paused") or not task.shim_alive:
            raise FailedPrecondition(f"task {task.container_id} is {task.status}: cannot exec")
        if request.exec_id in task.execs:
            raise AlreadyExists(f"process {request.exec_id} already exists in task {task.container_id}")
        self._shim_call(task, "shim.exec", request.model_dump(exclude={"container_id"}))
        task.execs[request.exec_id] = ExecState(
            request.exec_id,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            terminal=request.terminal,
        )
        self.events.publish(
            "/tasks/exec-added", task.namespace, TaskExecAdded(container_id=task.container_id, exec_id=request.exec_id)
        )
        return Empty()

    @handles("tasks.pids")
    def pids(self, request: ListPids, ctx: CallContext) -> PidsReply:
        """Every process in the task's container."""
        task = self._live(ctx.namespace, request.container_id)
        return PidsReply.model_validate(self._shim_call(task, "shim.pids", {}))

    @handles("tasks.pause")
    def pause(self, request: PauseTask, ctx: CallContext) -> Empty:
        """Freeze the task."""
        task = self._live(ctx.namespace, request.container_id)
        if task.status != "running":
            raise FailedPrecondition(f"task {task.container_id} is {task.status}, not running")
        self._shim_call(task, "shim.pause", {})
        task.status = "paused"
        self.events.publish("/tasks/paused", task.namespace, TaskPaused(container_id=task.container_id))
        return Empty()

    @handles("tasks.resume")
    def resume(self, request: ResumeTask, ctx: CallContext) -> Empty:
        """Thaw a paused task."""
        task = self._live(ctx.namespace, request.container_id)
        if task.status != "paused":
            raise FailedPrecondition(f"task {task.container_id} is {task.status}, not paused")
        self._shim_call(task, "shim.resume", {})
        task.status = "running"
        self.events.publish("/tasks/resumed", task.namespace, TaskResumed(container_id=task.container_id))
        return Empty()

    @handles("tasks.update")
    def update(self, request: UpdateTask, ctx: CallContext) -> Empty:
        """Change the task's resources (OCI LinuxResources)."""
        task = self._live(ctx.namespace, request.container_id)
        self._shim_call(task, "shim.update", {"resources": request.resources})
        return Empty()

    @handles("tasks.metrics")
    def metrics(self, request: TaskMetrics, ctx: CallContext) -> MetricsReply:
        """The task's cgroup statistics, read here from the cgroup files (no shim round trip)."""
        task = self._live(ctx.namespace, request.container_id)
        if not task.cgroups_path:
            raise FailedPrecondition(f"task {task.container_id} has no cgroup")
        try:
            if not cgroups.exists(task.cgroups_path):
                raise NotFound(f"the cgroup of task {task.container_id} is gone")
            data = cgroups.metrics(task.cgroups_path)
        except ValueError as exc:
            raise FailedPrecondition(str(exc)) from None
        return MetricsReply.model_validate({"container_id": task.container_id, **data})

    @handles("tasks.resize_pty")
    def resize_pty(self, request: ResizePty, ctx: CallContext) -> Empty:
        """Set a terminal's window size."""
        task = self._live(ctx.namespace, request.container_id)
        if request.exec_id:
            self._exec(task, request.exec_id)
        payload = {"exec_id": request.exec_id, "width": request.width, "height": request.height}
        self._shim_call(task, "shim.resize_pty", payload)
        return Empty()

    @handles("tasks.close_io")
    def close_io(self, request: CloseIO, ctx: CallContext) -> Empty:
        """Close a process's stdin."""
        task = self._live(ctx.namespace, request.container_id)
        if request.exec_id:
            self._exec(task, request.exec_id)
        if request.stdin:
            self._shim_call(task, "shim.close_io", {"exec_id": request.exec_id})
        return Empty()

    @handles("tasks.checkpoint")
    def checkpoint(self, request: CheckpointTask, ctx: CallContext) -> CheckpointTaskReply:
        """Checkpoint a running or paused task with runc and CRIU (the shim runs `runc checkpoint`).

        Refused with criu's own error when CRIU cannot work on this host. Without `exit`
        the task keeps running; with it the task stops (its exit comes as any exit does).
        """
        task = self._live(ctx.namespace, request.container_id)  # an unknown or stopped task is reported as such first
        if task.status not in ("running", "paused"):
            raise FailedPrecondition(f"cannot checkpoint task {task.container_id}: it is {task.status}")
        self._require_criu("checkpoint")
        path = request.path or os.path.join(
            self.config.root, CHECKPOINTS_DIR, task.namespace, f"{task.container_id}-{time.time_ns()}"
        )
        for what, value in (("image", path), ("work", request.work_path)):
            if value and not _clean_absolute(value):
                raise InvalidArgument(f"checkpoint {what} path {value!r} must be absolute, without '..'")
        if os.path.lexists(path) and (not os.path.isdir(path) or os.path.islink(path) or os.listdir(path)):
            raise AlreadyExists(f"checkpoint path {path} exists and is not an empty directory")
        payload = request.model_dump(exclude={"container_id"})
        payload["path"] = path
        self._shim_call(task, "shim.checkpoint", payload, timeout=CHECKPOINT_TIMEOUT)
        # containerd's TaskCheckpointed carries the checkpoint's name; ours is its path.
        self.events.publish("/tasks/checkpointed", task.namespace, TaskCheckpointed(container_id=task.container_id, checkpoint=path))
        return CheckpointTaskReply(path=path)

    def _require_criu(self, what: str) -> None:
        """Unimplemented unless criu is installed and `criu check` passes (run once per binary)."""
        criu = shutil.which("criu")
        if criu is None:
            raise Unimplemented(f"{what} needs CRIU, which is not installed on this host")
        if criu not in self.criu_checks:
            try:
                result = subprocess.run(
                    [criu, "check"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CRIU_CHECK_TIMEOUT
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                self.criu_checks[criu] = f"could not run it: {exc}"
            else:
                output = f"{result.stderr}\n{result.stdout}"
                lines = [line.strip() for line in output.splitlines() if line.strip()]
                failed = result.returncode != 0 or bool(first_criu_error(output))
                self.criu_checks[criu] = (first_criu_error(output) or (lines[-1] if lines else f"exit {result.returncode}")) if failed else ""
        error = self.criu_checks[criu]
        if error:
            raise Unimplemented(f"{what} needs CRIU; `criu check` fails on this host: {error}")

    # -- helpers --------------------------------------------------------------------

    def _exec(self, task: Task, exec_id: str) -> ExecState:
        proc = task.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"process {exec_id} not found in task {task.container_id}")
        return proc

    def _live(self, namespace: str, container_id: str) -> Task:
        """A task whose shim is still there (stopped tasks have nothing left to act on)."""
        task = self._task(namespace, container_id)
        if not task.shim_alive or task.status == "stopped":
            raise FailedPrecondition(f"task {container_id} is stopped")
        return task

    def _runtime_binary(self, runtime: dict[str, Any], options: dict[str, Any] | None) -> str:
        """The OCI runtime binary: create options, then the container's runtime options and name, then config."""
        chosen = ""
        for source in (options or {}, runtime.get("options") or {}):
            if not isinstance(source, dict):
                continue
            value = source.get("binary_name") or source.get("BinaryName") or ""
            if value:
                chosen = str(value)
                break
        if not chosen and str(runtime.get("name", "")) in CRUN_RUNTIME_NAMES:
            chosen = "crun"
        binary = chosen or self.runtime
        runtime_name(binary)  # InvalidArgument for anything but runc or crun
        return binary

    def _task(self, namespace: str, container_id: str) -> Task:
        task = self.tasks.get((namespace, container_id))
        if task is None:
            raise NotFound(f"task {container_id} not found in namespace {namespace}")
        return task

    def _task_spec(self, ns: str, cid: str, raw: bytes | str, has_mounts: bool) -> dict[str, Any]:
        """The container's spec as the bundle needs it."""
        if not raw:
            raise FailedPrecondition(f"container {cid} has no OCI spec")
        spec = load_spec(raw)
        root = spec.setdefault("root", {})
        if not isinstance(root, dict):
            raise InvalidArgument("spec root must be an object")
        if has_mounts:
            root["path"] = ROOTFS_DIR  # the shim mounts the rootfs there
        else:
            path = root.get("path")
            if not isinstance(path, str) or not os.path.isabs(path) or not os.path.isdir(path):
                raise InvalidArgument("no rootfs mounts given and the spec's root.path is not an absolute directory")
        linux = spec.setdefault("linux", {})
        if not isinstance(linux, dict):
            raise InvalidArgument("spec linux must be an object")
        if not linux.get("cgroupsPath"):
            linux["cgroupsPath"] = cgroups_path(ns, cid)
        return spec

    def _shim_call(self, task: Task, kind: str, payload: dict[str, Any], timeout: float = SHIM_CALL_TIMEOUT) -> dict[str, Any]:
        """Call the task's shim; a dead shim turns the task stopped (255) and answers Unavailable."""
        try:
            return task.call(kind, payload, timeout)
        except (Unavailable, DeadlineExceeded):
            if not shim_is_alive(task.shim_pid, task.namespace, task.container_id):
                self._shim_gone(task)
                raise Unavailable(f"the shim of task {task.container_id} is gone") from None
            raise

    def _exec_stopped(self, proc: ExecState, exit_status: int, exited_at: float) -> None:
        proc.status = "stopped"
        proc.exit_status = exit_status
        proc.exited_at = exited_at
        reply = WaitReply(exit_status=exit_status, exited_at=exited_at)
        waiters, proc.waiters = proc.waiters, []
        for ctx in waiters:
            ctx.reply(reply)

    def _stopped(self, task: Task, exit_status: int, exited_at: float) -> None:
        # The init's exit ends every exec'd process (the pid namespace goes with it).
        for proc in task.execs.values():
            if proc.status != "stopped":
                self._exec_stopped(proc, UNKNOWN_EXIT_STATUS if proc.status == "running" else 0, exited_at)
        task.status = "stopped"
        task.exit_status = exit_status
        task.exited_at = exited_at
        reply = WaitReply(exit_status=exit_status, exited_at=exited_at)
        waiters, task.waiters = task.waiters, []
        for ctx in waiters:
            ctx.reply(reply)

    def _shim_gone(self, task: Task) -> None:
        """The shim died: clean up after it and report the task stopped (255 unless recorded)."""
        if not task.shim_alive:
            return
        task.shim_alive = False
        task.disconnect()
        if self.monitor is not None:
            self.monitor.unwatch(task.key)
        recorded = read_exit(task.bundle)
        self._cleanup_runtime(task)
        if task.status == "stopped":
            return
        if recorded is not None:
            self._stopped(task, recorded["exit_status"], recorded["exited_at"])
            return
        log.warning("shim of %s/%s died without an exit: reporting %d", task.namespace, task.container_id, UNKNOWN_EXIT_STATUS)
        now = time.time()
        try:
            write_exit(task.bundle, task.pid, UNKNOWN_EXIT_STATUS, now)
        except OSError:
            log.exception("could not record the exit of %s", task.container_id)
        self._stopped(task, UNKNOWN_EXIT_STATUS, now)
        self.events.publish(
            "/tasks/exit",
            task.namespace,
            TaskExit(container_id=task.container_id, id=task.container_id, pid=task.pid, exit_status=UNKNOWN_EXIT_STATUS, exited_at=now),
        )

    def _cleanup_runtime(self, task: Task) -> None:
        """What a dead shim would have done: kill and delete runc's container, unmount the rootfs."""
        try:
            root = runtime_root(self.config.state, task.namespace, task.runtime)
            subprocess.run(
                runtime_command(task.runtime, root, "delete", "--force", task.container_id),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=RUNC_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired):
            log.exception("runc delete of %s failed", task.container_id)
        rootfs = os.path.join(task.bundle, ROOTFS_DIR)
        if is_mountpoint(rootfs):
            unmount_all(rootfs)

    def _dispose_shim(self, task: Task) -> None:
        """Make a shim we no longer want exit: ask it to delete, else kill it."""
        try:
            task.call("shim.delete", {}, 10)
        except MoordError:
            if shim_is_alive(task.shim_pid, task.namespace, task.container_id):
                os.kill(task.shim_pid, signal.SIGKILL)
        task.shim_alive = False
        task.disconnect()
        self._cleanup_runtime(task)

    def _remove_bundle(self, bundle: str) -> None:
        """Remove a bundle's known files and directories; never walks into a mounted rootfs."""
        rootfs = os.path.join(bundle, ROOTFS_DIR)
        if is_mountpoint(rootfs):
            raise Internal(f"{rootfs} is still mounted; not removing the bundle")
        names = list(BUNDLE_FILES)
        try:
            # Left by a shim that died between writing an exec's process file and runc reading it.
            names += [n for n in os.listdir(bundle) if n.startswith(EXEC_FILE_PREFIX) and n.endswith((".json", ".pid"))]
        except FileNotFoundError:
            pass
        for name in names:
            try:
                os.unlink(os.path.join(bundle, name))
            except FileNotFoundError:
                pass
        for path in (rootfs, bundle):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)

    # -- re-attach ------------------------------------------------------------------

    def _reattach(self) -> None:
        """Find every bundle, probe its shim in parallel, and adopt what is there."""
        base = os.path.join(self.config.state, BUNDLES_DIR)
        found: list[Key] = []
        for ns in sorted(os.listdir(base)):
            ns_dir = os.path.join(base, ns)
            if not os.path.isdir(ns_dir) or not _valid(ns):
                continue
            for cid in sorted(os.listdir(ns_dir)):
                if _valid(cid) and os.path.isdir(os.path.join(ns_dir, cid)):
                    found.append((ns, cid))
        if not found:
            return
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=min(32, len(found)), thread_name_prefix="runtime-probe") as pool:
            probes = list(pool.map(self._probe, found))
        for probe in probes:
            try:
                self._adopt(probe)
            except Exception:
                log.exception("could not re-attach to %s/%s", probe.namespace, probe.container_id)
        log.info("re-attached to %d bundles in %.1f ms", len(probes), (time.monotonic() - started) * 1000)

    def _probe(self, key: Key) -> _Probe:
        """Ask one shim for its state (runs in a pool thread; short deadline)."""
        ns, cid = key
        bundle = bundle_path(self.config.state, ns, cid)
        pid_text = (read_small(os.path.join(bundle, SHIM_PID_FILE)) or "").strip()
        shim_pid = int(pid_text) if pid_text.isdigit() else 0
        address = address_to_path(read_small(os.path.join(bundle, ADDRESS_FILE)) or "")
        state = None
        if address and shim_is_alive(shim_pid, ns, cid):
            connection = ShimConnection(address, ns)
            try:
                reply = connection.call("shim.state", {}, REATTACH_TIMEOUT)
                state = {**reply["process"], "execs": reply.get("execs") or []}
            except MoordError as exc:
                log.warning("shim %s/%s did not answer: %s", ns, cid, exc)
            finally:
                connection.close()
        return _Probe(ns, cid, bundle, shim_pid, address, state)

    def _adopt(self, probe: _Probe) -> None:
        task = Task(probe.namespace, probe.container_id, probe.bundle, probe.address, probe.shim_pid)
        task.runtime = (read_small(os.path.join(probe.bundle, RUNTIME_FILE)) or "").strip() or self.runtime
        task.cgroups_path = spec_cgroups_path(probe.bundle)
        state = probe.state
        if state is not None and state.get("status") in ("created", "running", "stopped", "paused"):
            task.pid = int(state.get("pid", 0))
            task.status = str(state["status"])
            task.stdin, task.stdout, task.stderr = state.get("stdin", ""), state.get("stdout", ""), state.get("stderr", "")
            task.terminal = bool(state.get("terminal", False))
            task.exit_status = int(state.get("exit_status", 0))
            task.exited_at = float(state.get("exited_at", 0.0))
            for item in state.get("execs") or []:
                proc = ExecState(
                    str(item["id"]),
                    pid=int(item.get("pid", 0)),
                    status=str(item.get("status", "created")),
                    stdin=item.get("stdin", ""),
                    stdout=item.get("stdout", ""),
                    stderr=item.get("stderr", ""),
                    terminal=bool(item.get("terminal", False)),
                    exit_status=int(item.get("exit_status", 0)),
                    exited_at=float(item.get("exited_at", 0.0)),
                )
                task.execs[proc.exec_id] = proc
            self.tasks[task.key] = task
            if task.status != "stopped":
                assert self.monitor is not None
                self.monitor.watch(task.key, task.address, task.shim_pid)
                for proc in task.execs.values():
                    if proc.status == "running":
                        self.monitor.watch_exec(task.key, proc.exec_id)
            log.info("re-attached to %s/%s (%s)", *task.key, task.status)
            return
        init_pid = (read_small(os.path.join(probe.bundle, INIT_PID_FILE)) or "").strip()
        if not init_pid.isdigit():
            # Never created (we died mid-create, or the shim never got as far): remove it.
            if state is not None:
                self._dispose_shim(task)
            else:
                self._cleanup_runtime(task)
            self._remove_bundle(probe.bundle)
            return
        # The shim is dead: its task is stopped, with the recorded exit or 255.
        task.pid = int(init_pid)
        task.status = "running"
        self.tasks[task.key] = task
        if state is None and shim_is_alive(probe.shim_pid, *task.key):
            os.kill(probe.shim_pid, signal.SIGKILL)  # alive but deaf: it cannot be trusted
        self._shim_gone(task)


def _clean_absolute(path: str) -> bool:
    """An absolute path without '..' components (checkpoint paths are the caller's, used as root)."""
    return os.path.isabs(path) and ".." not in path.split(os.sep)


def _valid(name: str) -> bool:
    try:
        validate_identifier(name)
    except MoordError:
        return False
    return True


def start(proc: Any) -> None:
    """Start the runtime subsystem in its process."""
    proc.serve(RuntimeActor, proc.config, proc.client, proc.events)
