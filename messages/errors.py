"""Typed errors shared by every process; each maps one-to-one onto a gRPC status code.

The codes are containerd's errdefs: a reply carries the code's name, the receiving side
raises the matching class, so `except NotFound` works across process borders.
"""

from __future__ import annotations


class MoordError(Exception):
    """Base of all errors that cross a process border; `code` names the condition."""

    code = "internal"
    grpc_code = 13  # INTERNAL

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")

    def to_wire(self) -> dict[str, str]:
        """The error as a reply payload."""
        return {"code": self.code, "message": self.message}


class InvalidArgument(MoordError):
    """The request is malformed or names something invalid."""

    code = "invalid_argument"
    grpc_code = 3


class NotFound(MoordError):
    """The named object does not exist (in this namespace)."""

    code = "not_found"
    grpc_code = 5


class AlreadyExists(MoordError):
    """An object with that name exists already."""

    code = "already_exists"
    grpc_code = 6


class FailedPrecondition(MoordError):
    """The object is not in a state that allows the operation."""

    code = "failed_precondition"
    grpc_code = 9


class Unavailable(MoordError):
    """The subsystem is not reachable now (stopped, restarting, or locked)."""

    code = "unavailable"
    grpc_code = 14


class DeadlineExceeded(MoordError):
    """The request's deadline passed before it was answered."""

    code = "deadline_exceeded"
    grpc_code = 4


class Unimplemented(MoordError):
    """The operation is not implemented by this subsystem."""

    code = "unimplemented"
    grpc_code = 12


class Canceled(MoordError):
    """The operation was canceled."""

    code = "canceled"
    grpc_code = 1


class OutOfRange(MoordError):
    """An offset or size lies outside what is valid (e.g. a write at the wrong offset)."""

    code = "out_of_range"
    grpc_code = 11


class Internal(MoordError):
    """An unexpected failure inside a subsystem."""

    code = "internal"
    grpc_code = 13


ERRORS_BY_CODE: dict[str, type[MoordError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Unimplemented,
        Canceled,
        OutOfRange,
        Internal,
    )
}


def error_from_wire(payload: object) -> MoordError:
    """Rebuild the typed error from a reply payload; anything malformed becomes Internal."""
    if isinstance(payload, dict):
        code = payload.get("code")
        message = payload.get("message")
        cls = ERRORS_BY_CODE.get(code if isinstance(code, str) else "", Internal)
        return cls(message if isinstance(message, str) else "")
    return Internal(f"malformed error reply: {payload!r:.200}")
