"""The shim's own API (runtime actor -> one moord-shim per container), on its ipc endpoint."""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Empty, Message, request
from moord.messages.tasks import DeleteTaskReply, PidReply, ProcessReply, WaitReply
from moord.messages.types import Mount


@request("shim.create", PidReply)
class ShimCreate(Message):
    """Mount the rootfs at <bundle>/rootfs, then runc create; stdio are FIFO paths or empty (/dev/null)."""

    rootfs: list[Mount] = Field(default_factory=list)
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@request("shim.start", PidReply)
class ShimStart(Message):
    """runc start."""


@request("shim.state", ProcessReply)
class ShimState(Message):
    """The task's state as the shim knows it."""


@request("shim.wait", WaitReply)
class ShimWait(Message):
    """Answered when the container's init exits."""


@request("shim.kill", Empty)
class ShimKill(Message):
    """Signal the init process (or all processes)."""

    signal: int = Field(default=15, ge=1, le=64)
    all: bool = False


@request("shim.delete", DeleteTaskReply)
class ShimDelete(Message):
    """runc delete; the shim exits after answering."""
