"""Containers service (containerd api/services/containers/v1): container records."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from moord.messages.base import Empty, Identifier, Labels, Message, request


class Runtime(Message):
    """The runtime that runs the container's task and its options."""

    name: str = Field(default="io.containerd.runc.v2", max_length=255)
    options: dict[str, Any] | None = None


class Container(Message):
    """A container record: what to run, not a running thing (that is a task)."""

    id: Identifier
    labels: Labels = Field(default_factory=dict)
    image: str = ""
    runtime: Runtime = Field(default_factory=Runtime)
    spec: bytes = b""  # the OCI runtime spec, JSON
    snapshotter: str = ""
    snapshot_key: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    extensions: dict[str, bytes] = Field(default_factory=dict)


class ContainerReply(Message):
    """One container."""

    container: Container


class ContainerList(Message):
    """Several containers."""

    containers: list[Container]


@request("containers.get", ContainerReply)
class GetContainer(Message):
    """Get a container by id."""

    id: Identifier


@request("containers.list", ContainerList)
class ListContainers(Message):
    """List containers matching any filter."""

    filters: list[str] = Field(default_factory=list)


@request("containers.create", ContainerReply)
class CreateContainer(Message):
    """Create a container record."""

    container: Container


@request("containers.update", ContainerReply)
class UpdateContainer(Message):
    """Update a container (update_mask: labels, labels.<key>, image, spec, snapshot_key, ...)."""

    container: Container
    update_mask: list[str] = Field(default_factory=list)


@request("containers.delete", Empty)
class DeleteContainer(Message):
    """Delete a container record."""

    id: Identifier
