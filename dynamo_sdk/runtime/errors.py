"""Typed errors of the runtime. Callers catch these, never raw NATS/etcd exceptions."""

from __future__ import annotations


class DynamoError(Exception):
    """Base class of every error the runtime raises."""


class RemoteError(DynamoError):
    """The callee raised: carries the remote exception's type name and message."""

    def __init__(self, target: str, error_type: str, message: str) -> None:
        self.target = target
        self.error_type = error_type
        self.remote_message = message
        super().__init__(f"{target} raised {error_type}: {message}")


class NoInstancesError(DynamoError):
    """No live instance of the endpoint is registered (after the configured wait)."""


class InstanceNotFoundError(NoInstancesError):
    """`direct()` named an instance id that is not (or no longer) registered."""


class StreamLostError(DynamoError):
    """The instance serving a stream died or went silent before the stream ended."""


class RuntimeConnectionError(DynamoError):
    """NATS or etcd could not be reached."""


class BadRequestError(DynamoError):
    """A request could not be decoded into the endpoint's request type."""
