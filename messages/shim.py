"""The shim's own API (runtime actor -> one moord-shim per container), on its ipc endpoint.

`exec_id` "" names the container's init process; any other names an exec'd process.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from moord.messages.base import Empty, Message, request
from moord.messages.tasks import DeleteTaskReply, ExecId, PidReply, PidsReply, Process, WaitReply
from moord.messages.types import Mount

_PATH = Field(default="", max_length=4096)


class ShimStateReply(Message):
    """The init process and every exec'd process the shim holds."""

    process: Process
    execs: list[Process] = Field(default_factory=list)


@request("shim.create", PidReply)
class ShimCreate(Message):
    """Mount the rootfs at <bundle>/rootfs, then `runc create` (with `checkpoint`: nothing
    more; the restore waits for shim.start, as containerd's createdCheckpointState).

    stdio are FIFO paths, empty (/dev/null), or for stdout/stderr a `file:///abs/path`
    log URI the shim appends to. With `terminal` the shim takes the pty master through
    runc's console socket and copies between it and the FIFOs.
    """

    rootfs: list[Mount] = Field(default_factory=list)
    stdin: str = _PATH
    stdout: str = _PATH
    stderr: str = _PATH
    terminal: bool = False
    checkpoint: str = _PATH  # a CRIU image: shim.start runs `runc restore` from it instead of `runc start`


@request("shim.start", PidReply)
class ShimStart(Message):
    """runc start (init) or runc exec --detach (an exec'd process)."""

    exec_id: ExecId = ""


@request("shim.state", ShimStateReply)
class ShimState(Message):
    """The task's state as the shim knows it."""


@request("shim.wait", WaitReply)
class ShimWait(Message):
    """Answered when the process exits."""

    exec_id: ExecId = ""


@request("shim.kill", Empty)
class ShimKill(Message):
    """Signal a process (or, for the init, all processes of the container)."""

    exec_id: ExecId = ""
    signal: int = Field(default=15, ge=1, le=64)
    all: bool = False


@request("shim.delete", DeleteTaskReply)
class ShimDelete(Message):
    """Init: runc delete, and the shim exits after answering. Exec: forget the process."""

    exec_id: ExecId = ""


@request("shim.exec", Empty)
class ShimExec(Message):
    """Record an exec'd process (an OCI process object); runc runs it on shim.start."""

    exec_id: ExecId
    spec: dict[str, Any]
    stdin: str = _PATH
    stdout: str = _PATH
    stderr: str = _PATH
    terminal: bool = False


@request("shim.pids", PidsReply)
class ShimPids(Message):
    """runc ps: every pid in the container."""


@request("shim.pause", Empty)
class ShimPause(Message):
    """runc pause."""


@request("shim.resume", Empty)
class ShimResume(Message):
    """runc resume."""


@request("shim.update", Empty)
class ShimUpdate(Message):
    """runc update --resources with an OCI LinuxResources object."""

    resources: dict[str, Any]


@request("shim.resize_pty", Empty)
class ShimResizePty(Message):
    """Set the window size of a terminal process."""

    exec_id: ExecId = ""
    width: int = Field(ge=1, le=65535)
    height: int = Field(ge=1, le=65535)


@request("shim.close_io", Empty)
class ShimCloseIO(Message):
    """Close the stdin the shim copies for a process."""

    exec_id: ExecId = ""


@request("shim.checkpoint", Empty)
class ShimCheckpoint(Message):
    """`runc checkpoint` the container into `path` (see messages.tasks.CheckpointTask)."""

    path: str = Field(min_length=1, max_length=4096)
    exit: bool = False
    work_path: str = _PATH
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: list[str] = Field(default_factory=list)
