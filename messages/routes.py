"""Which process serves each service. Kept free of pydantic so clients import it cheaply."""

from __future__ import annotations

# service prefix of a kind -> name of the process (and of its ipc endpoint)
SERVICE_PROCESS: dict[str, str] = {
    "namespaces": "metadata",
    "images": "metadata",
    "containers": "metadata",
    "leases": "metadata",
    "gc": "metadata",
    "content": "content",
    "contentmeta": "metadata",
    "snapshots": "snapshotter",
    "snapshotgc": "snapshotter",
    "contentgc": "content",
    "transfer": "images",
    "diff": "images",
    "tasks": "runtime",
    "events": "events",
    "supervisor": "supervisor",
}


def process_for(kind: str) -> str:
    """The process that serves `kind` (KeyError for an unknown service)."""
    return SERVICE_PROCESS[kind.split(".", 1)[0]]
