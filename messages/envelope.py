"""The one envelope and the one codec: msgpack frames between every pair of processes.

A request is one msgpack frame holding the envelope, followed by zero or more raw
frames for bulk bytes (blob chunks travel there, zero-copy, never inside msgpack):

    {"v": 1, "id": "...", "kind": "content.info", "ns": "default",
     "deadline": 1700000000.5, "lease": "", "payload": {...}}

A reply has the same id, kind "reply" or "error", and a payload. This module imports
only msgpack so that clients (moorctl, scripts) start fast; the pydantic model of the
envelope is validated on the receiving side.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from moord.messages.errors import InvalidArgument

PROTOCOL_VERSION = 1
# One request's envelope plus its extra frames may not exceed this (gRPC's default
# limit in ctr is 16 MiB as well); ZeroMQ itself drops peers only far above it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# ZeroMQ's own hard cap: a peer sending more is disconnected without a reply.
SOCKET_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
REPLY = "reply"
ERROR = "error"
DEFAULT_NAMESPACE = "default"


def pack(obj: Any) -> bytes:
    """Serialise one value with msgpack (binary strings stay bytes)."""
    return msgpack.packb(obj, use_bin_type=True, datetime=False)


def unpack(data: bytes) -> Any:
    """Deserialise one msgpack value; malformed input raises InvalidArgument."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidArgument(f"malformed msgpack frame: {exc}") from None


def request_frame(
    request_id: str,
    kind: str,
    payload: dict[str, Any],
    namespace: str = DEFAULT_NAMESPACE,
    deadline: float = 0.0,
    lease: str = "",
) -> bytes:
    """Encode a request envelope."""
    return pack(
        {
            "v": PROTOCOL_VERSION,
            "id": request_id,
            "kind": kind,
            "ns": namespace,
            "deadline": deadline,
            "lease": lease,
            "payload": payload,
        }
    )


def reply_frame(request_id: str, payload: Any, is_error: bool = False) -> bytes:
    """Encode a reply (or an error reply) envelope."""
    return pack(
        {"v": PROTOCOL_VERSION, "id": request_id, "kind": ERROR if is_error else REPLY, "payload": payload}
    )


def deadline_in(seconds: float) -> float:
    """An absolute deadline `seconds` from now (wall clock: it crosses processes)."""
    return time.time() + seconds


def event_frames(topic: str, namespace: str, event: dict[str, Any], timestamp: float | None = None) -> list[bytes]:
    """Encode an event as [topic, envelope]; subscribers filter on the topic frame's prefix."""
    return [
        topic.encode(),
        pack({"v": PROTOCOL_VERSION, "topic": topic, "ns": namespace, "timestamp": timestamp or time.time(), "event": event}),
    ]
