"""Where each service is served: the routing table clients and the gateway share.

Importing this module imports every message module, so KINDS is complete.
"""

from __future__ import annotations

from moord.messages import (  # noqa: F401  (imported for their @request declarations)
    containers,
    content,
    diff,
    distribution,
    events,
    gc,
    images,
    leases,
    namespaces,
    shim,
    snapshots,
    system,
    tasks,
    transfer,
)
from moord.messages.base import KINDS, KindSpec

__all__ = ["KINDS", "KindSpec"]
