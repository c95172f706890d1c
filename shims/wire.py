"""The shim's side of its API (messages/shim.py), decoded without pydantic.

A shim lives as long as its container, one per container, so every page it dirties is
paid per container. pydantic (and the message registry behind it) would add ~10 MiB
of shared and ~1 MiB of private memory per shim, so the shim checks its requests here
with plain Python: the same field names, types, defaults and bounds as the models in
messages/shim.py, which stay the contract (the runtime actor builds its requests with
them, and tests/test_shim_memory.py checks that this table matches them field by field).
Unknown fields are refused, as the models' extra=forbid does.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace
from typing import Any, Callable

from moord.messages import envelope as codec
from moord.messages.errors import DeadlineExceeded, InvalidArgument, Unimplemented

# messages/base.py's identifier rule (containerd's identifiers package); the test keeps
# the two equal.
IDENTIFIER_MAX_LENGTH = 76
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
PATH_MAX = 4096
MOUNT_TYPE_MAX = 64

Check = Callable[[str, Any], Any]


def _string(max_length: int) -> Check:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidArgument(f"{name}: expected a string")
        if len(value) > max_length:
            raise InvalidArgument(f"{name}: longer than {max_length} characters")
        return value

    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name}: expected a boolean")
    return value


def _int_between(low: int, high: int) -> Check:
    def check(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"{name}: expected an integer")
        if not low <= value <= high:
            raise InvalidArgument(f"{name}: must be between {low} and {high}")
        return value

    return check


def _exec_id(name: str, value: Any) -> str:
    """"" names the init process; anything else must be a containerd identifier."""
    value = _string(IDENTIFIER_MAX_LENGTH)(name, value)
    if value and not IDENTIFIER_RE.match(value):
        raise InvalidArgument(f"{name}: identifier {value!r} must match {IDENTIFIER_RE.pattern}")
    return value


def _required_exec_id(name: str, value: Any) -> str:
    value = _exec_id(name, value)
    if not value:
        raise InvalidArgument(f"{name}: identifier must not be empty")
    return value


def _object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidArgument(f"{name}: expected an object")
    return value


_MOUNT_FIELDS: dict[str, tuple[Check, Any]] = {
    "type": (_string(MOUNT_TYPE_MAX), None),
    "source": (_string(PATH_MAX), None),
    "target": (_string(PATH_MAX), ""),
    "options": (lambda name, value: _strings(name, value), []),
}


def _strings(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{name}: expected a list of strings")
    return value


def _mounts(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{name}: expected a list of mounts")
    return [_fields(f"{name}[{i}]", item, _MOUNT_FIELDS) for i, item in enumerate(value)]


_STDIO: dict[str, tuple[Check, Any]] = {
    "stdin": (_string(PATH_MAX), ""),
    "stdout": (_string(PATH_MAX), ""),
    "stderr": (_string(PATH_MAX), ""),
    "terminal": (_bool, False),
}
_EXEC_ID: dict[str, tuple[Check, Any]] = {"exec_id": (_exec_id, "")}


def _required_path(name: str, value: Any) -> str:
    value = _string(PATH_MAX)(name, value)
    if not value:
        raise InvalidArgument(f"{name}: must not be empty")
    return value


_CHECKPOINT: dict[str, tuple[Check, Any]] = {
    "path": (_required_path, None),
    "exit": (_bool, False),
    "work_path": (_string(PATH_MAX), ""),
    "open_tcp": (_bool, False),
    "external_unix_sockets": (_bool, False),
    "terminal": (_bool, False),
    "file_locks": (_bool, False),
    "empty_namespaces": (_strings, []),
}
_REQUIRED = object()  # a field without a default

# kind -> field -> (check, default); mirrors messages/shim.py.
REQUESTS: dict[str, dict[str, tuple[Check, Any]]] = {
    "shim.create": {"rootfs": (_mounts, []), **_STDIO, "checkpoint": (_string(PATH_MAX), "")},
    "shim.start": _EXEC_ID,
    "shim.state": {},
    "shim.wait": _EXEC_ID,
    "shim.kill": {**_EXEC_ID, "signal": (_int_between(1, 64), 15), "all": (_bool, False)},
    "shim.delete": _EXEC_ID,
    "shim.exec": {"exec_id": (_required_exec_id, _REQUIRED), "spec": (_object, _REQUIRED), **_STDIO},
    "shim.pids": {},
    "shim.pause": {},
    "shim.resume": {},
    "shim.update": {"resources": (_object, _REQUIRED)},
    "shim.resize_pty": {
        **_EXEC_ID,
        "width": (_int_between(1, 65535), _REQUIRED),
        "height": (_int_between(1, 65535), _REQUIRED),
    },
    "shim.close_io": _EXEC_ID,
    "shim.checkpoint": _CHECKPOINT,
}


def _fields(where: str, payload: Any, schema: dict[str, tuple[Check, Any]]) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidArgument(f"{where}: expected an object")
    unknown = [key for key in payload if key not in schema]
    if unknown:
        raise InvalidArgument(f"{where}: unknown field {str(unknown[0])[:64]!r}")
    values: dict[str, Any] = {}
    for name, (check, default) in schema.items():
        if name in payload:
            values[name] = check(f"{where}.{name}", payload[name])
        elif default is _REQUIRED or default is None:
            raise InvalidArgument(f"{where}.{name}: field required")
        else:
            values[name] = list(default) if isinstance(default, list) else default
    return values


class Request(SimpleNamespace):
    """A decoded shim request: `kind`, `request_id` and its fields as attributes."""

    kind: str
    request_id: str


def decode(frame: bytes, served: Any) -> Request:
    """Decode and check one request envelope; `served` is the set of kinds the shim serves.

    A failure raises a typed error whose `request_id` attribute (when known) names the
    request, so the caller can still address its error reply.
    """
    envelope = codec.unpack(frame)
    if not isinstance(envelope, dict):
        raise InvalidArgument("the envelope must be a map")
    request_id = envelope.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 256:
        raise InvalidArgument("the envelope needs an id")
    try:
        if envelope.get("v") != codec.PROTOCOL_VERSION:
            raise InvalidArgument(f"unsupported protocol version {str(envelope.get('v'))[:16]!r}")
        kind = envelope.get("kind")
        if not isinstance(kind, str):
            raise InvalidArgument("the envelope needs a kind")
        if kind not in served or kind not in REQUESTS:
            raise Unimplemented(f"the shim does not serve {kind[:128]!r}")
        deadline = envelope.get("deadline") or 0.0
        if not isinstance(deadline, (int, float)):
            raise InvalidArgument("deadline must be a number")
        if deadline and deadline < time.time():
            raise DeadlineExceeded(f"{kind}: deadline passed before the shim read it")
        payload = envelope.get("payload")
        values = _fields(kind, {} if payload is None else payload, REQUESTS[kind])
    except (InvalidArgument, Unimplemented, DeadlineExceeded) as exc:
        exc.request_id = request_id  # type: ignore[attr-defined]
        raise
    return Request(kind=kind, request_id=request_id, **values)


def decode_payload(kind: str, payload: Any, request_id: str = "spawn") -> Request:
    """Check a payload handed over outside an envelope (shim.create with the spawn)."""
    return Request(kind=kind, request_id=request_id, **_fields(kind, payload, REQUESTS[kind]))


def request_id_of(exc: Exception) -> str:
    """The request id a decode failure belongs to ("" when the envelope had none)."""
    return str(getattr(exc, "request_id", "") or "")
