"""Leases service (containerd api/services/leases/v1).

A lease holds resources (content, snapshots, ingests) alive against garbage collection
until it is deleted or its `containerd.io/gc.expire` label (RFC 3339) has passed. The
lease of a request (the envelope's `lease`, gRPC's `containerd-lease`) holds what the
request creates. Lease ids are not containerd identifiers: clients generate them
(`<nanos>-<base64url>`), so any short run of printable characters is accepted.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from moord.messages.base import IDENTIFIER_MAX_LENGTH, Empty, Labels, Message, request

LABEL_GC_EXPIRE = "containerd.io/gc.expire"
LABEL_GC_FLAT = "containerd.io/gc.flat"
RESOURCE_CONTENT = "content"
RESOURCE_INGESTS = "ingests"
RESOURCE_SNAPSHOTS = "snapshots"  # typed "snapshots/<snapshotter>"

# Printable ASCII without spaces, as short as an envelope's lease field.
LeaseId = Annotated[
    str, StringConstraints(min_length=1, max_length=IDENTIFIER_MAX_LENGTH, pattern=r"^[\x21-\x7e]+$")
]


class Lease(Message):
    """A lease as listed."""

    id: str
    labels: Labels = Field(default_factory=dict)
    created_at: float = 0.0


class LeaseResource(Message):
    """What a lease holds: `type` content, ingests or snapshots/<snapshotter>."""

    id: str = Field(min_length=1, max_length=4096)
    type: str = Field(min_length=1, max_length=128)


class LeaseReply(Message):
    """One lease."""

    lease: Lease


class LeaseList(Message):
    """Several leases."""

    leases: list[Lease]


class ResourceList(Message):
    """The resources of one lease."""

    resources: list[LeaseResource]


@request("leases.create", LeaseReply)
class CreateLease(Message):
    """Create a lease (id "" = generated); `containerd.io/gc.expire` sets its expiry."""

    id: LeaseId | None = None
    labels: Labels = Field(default_factory=dict)


@request("leases.list", LeaseList)
class ListLeases(Message):
    """Leases of the namespace matching any filter (fields: id, labels)."""

    filters: list[str] = Field(default_factory=list)


@request("leases.delete", Empty)
class DeleteLease(Message):
    """Delete a lease; with `sync`, answer only after a garbage collection has run."""

    id: LeaseId
    sync: bool = False


@request("leases.add_resource", Empty)
class AddLeaseResource(Message):
    """Make a lease hold a resource (which need not exist yet)."""

    id: LeaseId
    resource: LeaseResource


@request("leases.delete_resource", Empty)
class DeleteLeaseResource(Message):
    """Let a lease stop holding a resource."""

    id: LeaseId
    resource: LeaseResource


@request("leases.list_resources", ResourceList)
class ListLeaseResources(Message):
    """The resources a lease holds."""

    id: LeaseId
