"""Reading one request off the wire: the checks every server (bridge or shim) makes.

Size, msgpack, envelope, protocol version, deadline, namespace, kind, payload — each
defect raises its typed error with the request id attached (when it could be read), so
the server answers it instead of crashing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from moord.messages import envelope as codec
from moord.messages.base import Envelope, KindSpec, Message, validate_identifier, validate_payload
from moord.messages.errors import DeadlineExceeded, InvalidArgument, MoordError, Unimplemented
from moord.messages.registry import KINDS

_ENVELOPE_SPEC = KindSpec("envelope", Envelope, Envelope)


@dataclass
class Request:
    """A request that passed every check."""

    request_id: str
    envelope: Envelope
    spec: KindSpec
    message: Message
    extra: list[Any]


def request_id_of(exc: MoordError) -> str:
    """The id of the request an error answers ("" when the envelope was unreadable)."""
    return getattr(exc, "request_id", "")


def _size(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def decode_request(frames: Sequence[Any], accept: Callable[[KindSpec], None]) -> Request:
    """Check and decode [envelope, *extra] (bytes or buffers); `accept` raises for kinds not served here."""
    request_id = ""
    try:
        if not frames:
            raise InvalidArgument("empty request: want an envelope frame")
        total = sum(_size(f) for f in frames)
        if total > codec.MAX_MESSAGE_BYTES:
            raise InvalidArgument(f"request of {total} bytes exceeds the limit of {codec.MAX_MESSAGE_BYTES} bytes")
        raw = codec.unpack(bytes(frames[0]))
        if not isinstance(raw, dict):
            raise InvalidArgument("envelope must be a map")
        if isinstance(raw.get("id"), str):
            request_id = raw["id"][:128]
        envelope = validate_payload(_ENVELOPE_SPEC, raw)
        assert isinstance(envelope, Envelope)
        envelope.check_version()
        if envelope.deadline and time.time() > envelope.deadline:
            raise DeadlineExceeded(f"{envelope.kind}: deadline passed before it arrived")
        validate_identifier(envelope.ns)
        spec = KINDS.get(envelope.kind)
        if spec is None:
            raise Unimplemented(f"unknown request kind {envelope.kind[:128]!r}")
        accept(spec)
        message = validate_payload(spec, envelope.payload)
        return Request(request_id, envelope, spec, message, list(frames[1:]))
    except MoordError as exc:
        exc.request_id = request_id  # type: ignore[attr-defined]
        raise
