"""Events: the envelope subscribers receive, and the event payloads by topic.

Topics follow containerd's (/tasks/exit, /containers/create, ...); payload fields follow
containerd's api/events.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from moord.messages.base import Empty, Message, request
from moord.messages.types import Mount


class EventEnvelope(Message):
    """An event as it travels on the exchange."""

    v: int
    topic: str
    ns: str
    timestamp: float
    event: dict[str, Any]


@request("events.publish", Empty)
class PublishEvent(Message):
    """Publish an event from a script (topic must start with '/')."""

    topic: str = Field(pattern=r"^/[A-Za-z0-9_\-/.]+$", max_length=256)
    event: dict[str, Any] = Field(default_factory=dict)


class ContainerCreate(Message):
    """/containers/create"""

    id: str
    image: str = ""
    runtime: dict[str, Any] = Field(default_factory=dict)


class ContainerDelete(Message):
    """/containers/delete"""

    id: str


class ImageCreate(Message):
    """/images/create, /images/update"""

    name: str
    labels: dict[str, str] = Field(default_factory=dict)


class ImageDelete(Message):
    """/images/delete"""

    name: str


class TaskCreate(Message):
    """/tasks/create"""

    container_id: str
    bundle: str = ""
    rootfs: list[Mount] = Field(default_factory=list)
    io: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str = ""
    pid: int = 0


class TaskStart(Message):
    """/tasks/start"""

    container_id: str
    pid: int


class TaskExit(Message):
    """/tasks/exit"""

    container_id: str
    id: str
    pid: int
    exit_status: int
    exited_at: float


class TaskDelete(Message):
    """/tasks/delete"""

    container_id: str
    id: str = ""
    pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0


class TaskOOM(Message):
    """/tasks/oom"""

    container_id: str


class TaskPaused(Message):
    """/tasks/paused"""

    container_id: str


class TaskResumed(Message):
    """/tasks/resumed"""

    container_id: str


class TaskCheckpointed(Message):
    """/tasks/checkpointed"""

    container_id: str
    checkpoint: str


class TaskExecAdded(Message):
    """/tasks/exec-added"""

    container_id: str
    exec_id: str


class TaskExecStarted(Message):
    """/tasks/exec-started"""

    container_id: str
    exec_id: str
    pid: int


class SnapshotPrepare(Message):
    """/snapshot/prepare"""

    key: str
    parent: str = ""
    snapshotter: str = ""


class SnapshotCommit(Message):
    """/snapshot/commit"""

    key: str
    name: str
    snapshotter: str = ""


class SnapshotRemove(Message):
    """/snapshot/remove"""

    key: str
    snapshotter: str = ""


class NamespaceCreate(Message):
    """/namespaces/create, /namespaces/update"""

    name: str
    labels: dict[str, str] = Field(default_factory=dict)


class NamespaceDelete(Message):
    """/namespaces/delete"""

    name: str
