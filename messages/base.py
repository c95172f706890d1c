"""The pydantic side of the contract: message base class, envelope model, kind registry.

Every request kind ("content.info", "tasks.create", ...) is declared once with
`@request(kind, Reply)` on its request model. The receiving bridge looks the kind up,
validates the payload, and hands the model to the actor that serves the kind's service.
Services map to processes through SERVICE_PROCESS, which clients use for routing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from moord.messages.envelope import PROTOCOL_VERSION
from moord.messages.errors import InvalidArgument

# containerd's identifiers package: like DNS labels, relaxed; at most 76 characters.
IDENTIFIER_MAX_LENGTH = 76
_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
# A label's key and value together (containerd's labels.Validate).
LABEL_MAX_BYTES = 4096


def validate_identifier(value: str) -> str:
    """Return `value` if it is a valid containerd identifier, else raise InvalidArgument."""
    if not value:
        raise InvalidArgument("identifier must not be empty")
    if len(value) > IDENTIFIER_MAX_LENGTH:
        raise InvalidArgument(
            f"identifier {value[:80]!r} greater than maximum length ({IDENTIFIER_MAX_LENGTH} characters)"
        )
    if not _IDENTIFIER_RE.match(value):
        raise InvalidArgument(f"identifier {value!r} must match {_IDENTIFIER_RE.pattern}")
    return value


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Return `labels` if every key plus value fits containerd's 4096-byte limit."""
    for key, value in labels.items():
        if not key:
            raise InvalidArgument("label key must not be empty")
        size = len(key.encode()) + len(value.encode())
        if size > LABEL_MAX_BYTES:
            raise InvalidArgument(f"label key and value greater than maximum size ({LABEL_MAX_BYTES} bytes), key: {key[:64]}")
    return labels


def _identifier(value: str) -> str:
    try:
        return validate_identifier(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def _labels(value: dict[str, str]) -> dict[str, str]:
    try:
        return validate_labels(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


Identifier = Annotated[str, AfterValidator(_identifier)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


def _digest(value: str) -> str:
    if not _DIGEST_RE.match(value):
        raise ValueError(f"invalid digest {value[:100]!r}: want sha256:<64 lowercase hex>")
    return value


Digest = Annotated[str, AfterValidator(_digest)]


class Message(BaseModel):
    """Base of every request, reply and event: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False)


class Empty(Message):
    """A request or reply without fields."""


class Envelope(Message):
    """The request envelope as validated by the receiving bridge."""

    v: int
    id: str = Field(min_length=1, max_length=128)
    kind: str = Field(min_length=1, max_length=128)
    ns: str = Field(default="default", max_length=IDENTIFIER_MAX_LENGTH)
    deadline: float = 0.0
    lease: str = Field(default="", max_length=IDENTIFIER_MAX_LENGTH)
    payload: dict[str, Any] = Field(default_factory=dict)

    def check_version(self) -> None:
        """Refuse envelopes of a protocol version this build does not speak."""
        if self.v != PROTOCOL_VERSION:
            raise InvalidArgument(f"unsupported protocol version {self.v} (this side speaks {PROTOCOL_VERSION})")


@dataclass(frozen=True)
class KindSpec:
    """What a request kind takes and answers, and which service serves it."""

    kind: str
    request: type[Message]
    reply: type[Message]

    @property
    def service(self) -> str:
        """The service prefix of the kind ("content" for "content.info")."""
        return self.kind.split(".", 1)[0]


KINDS: dict[str, KindSpec] = {}
M = TypeVar("M", bound=type[Message])


def request(kind: str, reply: type[Message]) -> Callable[[M], M]:
    """Declare the decorated model as the request of `kind`, answered by `reply`."""

    def register(model: M) -> M:
        if kind in KINDS:
            raise RuntimeError(f"request kind {kind} declared twice")
        KINDS[kind] = KindSpec(kind, model, reply)
        return model

    return register


def validate_payload(spec: KindSpec, payload: dict[str, Any]) -> Message:
    """Validate a request payload against its kind; failures become InvalidArgument."""
    try:
        return spec.request.model_validate(payload)
    except ValidationError as exc:
        raise InvalidArgument(f"{spec.kind}: {_summarise(exc)}") from None


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
