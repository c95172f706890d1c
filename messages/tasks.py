"""Tasks service (containerd api/services/tasks/v1): running a container's processes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from moord.messages.base import Empty, Identifier, Message, request
from moord.messages.types import Mount

TaskStatus = Literal["unknown", "created", "running", "stopped", "paused", "pausing"]
# containerd reports this exit status when a task's real status could not be learnt.
UNKNOWN_EXIT_STATUS = 255
_PATH = Field(default="", max_length=4096)


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


@request("tasks.start", PidReply)
class StartTask(Message):
    """Start a created task (or an exec'd process)."""

    container_id: Identifier
    exec_id: str = ""


@request("tasks.delete", DeleteTaskReply)
class DeleteTask(Message):
    """Delete a stopped task and release its resources."""

    container_id: Identifier


@request("tasks.get", ProcessReply)
class GetTask(Message):
    """State of a task."""

    container_id: Identifier
    exec_id: str = ""


@request("tasks.list", ProcessList)
class ListTasks(Message):
    """Tasks of this namespace."""

    filter: str = ""


@request("tasks.kill", Empty)
class KillTask(Message):
    """Send a signal to the task's init (or all its processes)."""

    container_id: Identifier
    exec_id: str = ""
    signal: int = Field(default=15, ge=1, le=64)
    all: bool = False


@request("tasks.wait", WaitReply)
class WaitTask(Message):
    """Block until the task exits; allowed before Start (ctr calls it first)."""

    container_id: Identifier
    exec_id: str = ""
