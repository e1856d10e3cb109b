"""`dynamo_context`: who and where the current code runs.

A worker fills it in at start-up (namespace, component, instance id, worker index, runtime);
the endpoint name and request id are per request (context variables), so concurrent requests
each see their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynamo_sdk.runtime.context import bind_request, current_endpoint, current_request_id

if TYPE_CHECKING:
    from dynamo_sdk.runtime.runtime import DistributedRuntime


class NoRuntimeError(RuntimeError):
    """Raised when code needs the distributed runtime outside a running worker."""


class DynamoContext:
    """Process-wide facts about the running worker, plus per-request ones."""

    def __init__(self) -> None:
        self.namespace: str | None = None
        self.component: str | None = None
        self.worker_index: int | None = None
        self.runtime: DistributedRuntime | None = None
        # Seconds of a drain's grace that this worker's @async_on_shutdown hooks need (an
        # engine that takes seconds to stop): in-flight streams get the rest, so the whole
        # drain ends within the grace instead of being killed at its end. Set it in
        # @async_on_start once the need is known.
        self.shutdown_reserve: float = 0.0

    @property
    def instance_id(self) -> int | None:
        return self.runtime.instance_id if self.runtime is not None else None

    @property
    def endpoint(self) -> str | None:
        return current_endpoint.get()

    @property
    def request_id(self) -> str | None:
        return current_request_id.get()

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "component": self.component,
            "endpoint": self.endpoint,
            "instance_id": self.instance_id,
            "worker_index": self.worker_index,
            "request_id": self.request_id,
        }

    def __repr__(self) -> str:
        return f"DynamoContext({self.as_dict()})"


dynamo_context = DynamoContext()


def set_request_context(endpoint: str, request_id: str) -> None:
    """Bind the endpoint name and request id for the current task (the runtime's endpoint
    server does this for every request it serves)."""
    bind_request(endpoint, request_id)


def current_runtime() -> DistributedRuntime:
    """The runtime of this worker; a clear error outside one."""
    if dynamo_context.runtime is None:
        raise NoRuntimeError(
            "no Dynamo runtime in this process: depends() clients exist inside a worker started "
            "by `dynamo serve` (or after DistributedRuntime.connect() set dynamo_context.runtime)"
        )
    return dynamo_context.runtime
