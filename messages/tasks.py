"""Tasks service (containerd api/services/tasks/v1): running a container's processes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from moord.messages.base import Empty, Identifier, Message, request, validate_identifier
from moord.messages.errors import InvalidArgument
from moord.messages.types import Mount

TaskStatus = Literal["unknown", "created", "running", "stopped", "paused", "pausing"]
# containerd reports this exit status when a task's real status could not be learnt.
UNKNOWN_EXIT_STATUS = 255
_PATH = Field(default="", max_length=4096)


def _exec_id(value: str) -> str:
    # "" names the task's init process; anything else must be a valid identifier.
    if not value:
        return value
    try:
        return validate_identifier(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


ExecId = Annotated[str, AfterValidator(_exec_id)]


class Process(Message):
    """A task's (or exec'd) process as the runtime knows it."""

    container_id: str
    id: str = ""
    pid: int = 0
    status: TaskStatus = "unknown"
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: float = 0.0


class CreateTaskReply(Message):
    """The created task's init pid."""

    container_id: str
    pid: int


class PidReply(Message):
    """A process id."""

    pid: int


class DeleteTaskReply(Message):
    """How a deleted task ended."""

    id: str
    pid: int
    exit_status: int
    exited_at: float


class ProcessReply(Message):
    """One process."""

    process: Process


class ProcessList(Message):
    """Several tasks."""

    tasks: list[Process]


class WaitReply(Message):
    """How the process ended."""

    exit_status: int
    exited_at: float


@request("tasks.create", CreateTaskReply)
class CreateTask(Message):
    """Create the task of a container: rootfs mounts plus stdio FIFO paths (empty: none)."""

    container_id: Identifier
    rootfs: list[Mount] = Field(default_factory=list)
    stdin: str = _PATH
    stdout: str = _PATH
    stderr: str = _PATH
    terminal: bool = False
    options: dict[str, Any] | None = None
    runtime_path: str = _PATH
    # A CRIU image directory (tasks.checkpoint's path): the task is restored from it at
    # tasks.start (`runc restore`) instead of started afresh, as containerd does.
    checkpoint: str = _PATH


@request("tasks.start", PidReply)
class StartTask(Message):
    """Start a created task (or an exec'd process)."""

    container_id: Identifier
    exec_id: ExecId = ""


@request("tasks.delete", DeleteTaskReply)
class DeleteTask(Message):
    """Delete a stopped task (or a created/stopped exec'd process) and release its resources."""

    container_id: Identifier
    exec_id: ExecId = ""


@request("tasks.get", ProcessReply)
class GetTask(Message):
    """State of a task."""

    container_id: Identifier
    exec_id: ExecId = ""


@request("tasks.list", ProcessList)
class ListTasks(Message):
    """Tasks of this namespace."""

    filter: str = ""


@request("tasks.kill", Empty)
class KillTask(Message):
    """Send a signal to the task's init (or all its processes)."""

    container_id: Identifier
    exec_id: ExecId = ""
    signal: int = Field(default=15, ge=1, le=64)
    all: bool = False


@request("tasks.wait", WaitReply)
class WaitTask(Message):
    """Block until the task exits; allowed before Start (ctr calls it first)."""

    container_id: Identifier
    exec_id: ExecId = ""


class ProcessInfo(Message):
    """One process of a task's container, and the exec that started it ("" for others)."""

    pid: int
    exec_id: str = ""


class PidsReply(Message):
    """Every process in the task's container."""

    processes: list[ProcessInfo]


@request("tasks.exec", Empty)
class ExecProcess(Message):
    """Add a process to a running task (started by tasks.start with its exec_id).

    `spec` is an OCI process object (args, env, cwd, user, terminal, capabilities...).
    """

    container_id: Identifier
    exec_id: Identifier
    spec: dict[str, Any]
    stdin: str = _PATH
    stdout: str = _PATH
    stderr: str = _PATH
    terminal: bool = False


@request("tasks.pids", PidsReply)
class ListPids(Message):
    """The pids in the task's container (containerd's ListPids)."""

    container_id: Identifier


@request("tasks.pause", Empty)
class PauseTask(Message):
    """Freeze every process of the task (cgroup freezer)."""

    container_id: Identifier


@request("tasks.resume", Empty)
class ResumeTask(Message):
    """Thaw a paused task."""

    container_id: Identifier


@request("tasks.update", Empty)
class UpdateTask(Message):
    """Change a running task's resources: an OCI LinuxResources object (memory, cpu, pids...)."""

    container_id: Identifier
    resources: dict[str, Any]


class CpuMetrics(Message):
    """CPU time in nanoseconds and CFS throttling."""

    usage_total: int = 0
    usage_user: int = 0
    usage_kernel: int = 0
    periods: int = 0
    throttled_periods: int = 0
    throttled_time: int = 0


class MemoryMetrics(Message):
    """Memory in bytes; limit 0 means unlimited."""

    usage: int = 0
    max_usage: int = 0
    limit: int = 0
    cache: int = 0
    rss: int = 0
    failcnt: int = 0
    oom_kills: int = 0


class PidsMetrics(Message):
    """Number of tasks; limit 0 means unlimited."""

    current: int = 0
    limit: int = 0


class IoMetrics(Message):
    """Block I/O bytes and operations."""

    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


class MetricsReply(Message):
    """A task's cgroup statistics (containerd's cgroups v1/v2 Metrics, flattened)."""

    container_id: str
    timestamp: float
    cgroup_version: int
    cpu: CpuMetrics
    memory: MemoryMetrics
    pids: PidsMetrics
    io: IoMetrics


@request("tasks.metrics", MetricsReply)
class TaskMetrics(Message):
    """Read the task's cgroup statistics."""

    container_id: Identifier


@request("tasks.resize_pty", Empty)
class ResizePty(Message):
    """Set a terminal process's window size."""

    container_id: Identifier
    exec_id: ExecId = ""
    width: int = Field(ge=1, le=65535)
    height: int = Field(ge=1, le=65535)


@request("tasks.close_io", Empty)
class CloseIO(Message):
    """Close a process's stdin (the container reads EOF)."""

    container_id: Identifier
    exec_id: ExecId = ""
    stdin: bool = True


class CheckpointTaskReply(Message):
    """Where the checkpoint image was written."""

    path: str


@request("tasks.checkpoint", CheckpointTaskReply)
class CheckpointTask(Message):
    """Checkpoint a running or paused task through runc and CRIU (containerd's CheckpointOptions).

    `path` is the absolute directory the CRIU image goes to ("": a new directory under the
    daemon's root, named in the reply); it must not exist or be empty. `exit` stops the
    task after the dump (runc without --leave-running); otherwise it keeps running.
    `work_path` keeps CRIU's logs there ("": a directory in the bundle, removed after).
    The flags map to runc checkpoint's --tcp-established, --ext-unix-sk, --shell-job,
    --file-locks and --empty-ns.
    """

    container_id: Identifier
    path: str = _PATH
    exit: bool = False
    work_path: str = _PATH
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: list[Literal["network", "ipc", "uts", "pid", "mount", "user", "cgroup"]] = Field(default_factory=list)
