"""Typed errors of the runtime, and the codes every error crosses processes as.

Callers catch these, never raw NATS/etcd exceptions. An exception raised in a handler reaches
its caller as a `RemoteError` carrying an `ErrorCode` (what kind of failure: the caller's
edge turns it into an HTTP status), plus the remote class name and message for people to
read. Any exception that knows its kind subclasses `CodedError` and sets `code`; anything
else arrives as `INTERNAL`.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """What kind of failure, independent of the process or class that raised it."""

    INVALID_REQUEST = "invalid_request"  # the request asks for something it may not: fix it
    NOT_FOUND = "not_found"  # what it names (a model, an instance) does not exist
    UNAVAILABLE = "unavailable"  # nobody can serve it now (no live instance): retry later
    SHUTTING_DOWN = "shutting_down"  # the instance is draining: retry elsewhere
    UPSTREAM = "upstream"  # a stream's callee died or went silent mid-way
    INTERNAL = "internal"  # a bug or an engine failure: nothing the caller can change


class CodedError(Exception):
    """An exception that says which kind of failure it is (so it crosses processes typed)."""

    code: ErrorCode = ErrorCode.INTERNAL


def code_of(exc: BaseException) -> ErrorCode:
    """The code an exception travels as."""
    return exc.code if isinstance(exc, CodedError) else ErrorCode.INTERNAL


class DynamoError(CodedError):
    """Base class of every error the runtime raises."""


class RemoteError(DynamoError):
    """The callee raised: carries its error code, exception type name and message."""

    def __init__(
        self,
        target: str,
        error_type: str,
        message: str,
        code: ErrorCode = ErrorCode.INTERNAL,
    ) -> None:
        self.target = target
        self.error_type = error_type
        self.remote_message = message
        self.code = code  # the callee's, forwarded as it is
        super().__init__(f"{target} raised {error_type}: {message}")


class NoInstancesError(DynamoError):
    """No live instance of the endpoint is registered (after the configured wait)."""

    code = ErrorCode.UNAVAILABLE


class InstanceNotFoundError(NoInstancesError):
    """`direct()` named an instance id that is not (or no longer) registered."""


class StreamLostError(DynamoError):
    """The instance serving a stream died or went silent before the stream ended."""

    code = ErrorCode.UPSTREAM


class RuntimeConnectionError(DynamoError):
    """NATS or etcd could not be reached."""

    code = ErrorCode.UNAVAILABLE


class BadRequestError(DynamoError):
    """A request could not be decoded into the endpoint's request type."""

    code = ErrorCode.INVALID_REQUEST
