"""Namespaces service (containerd api/services/namespaces/v1)."""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Empty, Identifier, Labels, Message, request


class Namespace(Message):
    """A namespace and its labels."""

    name: Identifier
    labels: Labels = Field(default_factory=dict)


class NamespaceReply(Message):
    """One namespace."""

    namespace: Namespace


class NamespaceList(Message):
    """All namespaces."""

    namespaces: list[Namespace]


@request("namespaces.get", NamespaceReply)
class GetNamespace(Message):
    """Get a namespace; one that does not exist yet answers with empty labels (ctr relies on it)."""

    name: Identifier


@request("namespaces.list", NamespaceList)
class ListNamespaces(Message):
    """List namespaces."""

    filter: str = ""


@request("namespaces.create", NamespaceReply)
class CreateNamespace(Message):
    """Create a namespace."""

    namespace: Namespace


@request("namespaces.update", NamespaceReply)
class UpdateNamespace(Message):
    """Update a namespace's labels (update_mask: `labels` or `labels.<key>`)."""

    namespace: Namespace
    update_mask: list[str] = Field(default_factory=list)


@request("namespaces.delete", Empty)
class DeleteNamespace(Message):
    """Delete a namespace; refused while it still holds objects."""

    name: Identifier
