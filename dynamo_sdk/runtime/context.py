"""What the runtime knows about the request a handler is serving: its endpoint and call id.

Context variables, set by the endpoint server in each request's own task, so concurrent
requests each see their own. The SDK's `dynamo_context` reads them; the runtime knows nothing
of the SDK.
"""

from __future__ import annotations

import contextvars

current_endpoint: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dynamo_endpoint", default=None
)
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dynamo_request_id", default=None
)


def bind_request(endpoint: str, request_id: str) -> None:
    """Bind the endpoint name and request id for the current task."""
    current_endpoint.set(endpoint)
    current_request_id.set(request_id)
