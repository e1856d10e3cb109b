"""`@endpoint()` and `@api()`: mark a service method as callable from elsewhere.

An endpoint is reached over NATS by other services (through `depends()`); an api route is
reached over HTTP on the service's own ASGI server. Both are async generators (streamed) or
plain coroutines (one answer). The decorators only attach an `EndpointSpec`; the worker
process reads it when it serves the class.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ENDPOINT_ATTR = "__dynamo_endpoint__"
API_ATTR = "__dynamo_api__"

StreamFormat = Literal["ndjson", "sse", "text"]


@dataclass(frozen=True)
class EndpointSpec:
    """What the runtime needs to know about one endpoint method."""

    name: str
    method_name: str
    request_type: Any  # annotation of the single request argument, or Any
    response_type: Any  # item type of the stream (or the return type), or Any
    streaming: bool


@dataclass(frozen=True)
class ApiSpec:
    """An HTTP route served by the service's ASGI server."""

    path: str
    methods: tuple[str, ...]
    method_name: str
    request_type: Any
    streaming: bool
    stream_format: StreamFormat = "ndjson"
    extra: dict[str, Any] = field(default_factory=dict)


def _signature_types(func: Callable[..., Any]) -> tuple[Any, Any, bool]:
    """Return (request type, response item type, is_streaming) from a method's annotations."""
    streaming = inspect.isasyncgenfunction(func)
    if not streaming and not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"{func.__qualname__}: endpoints must be `async def` (an async generator to stream, "
            "or a coroutine for a single answer)"
        )
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # forward refs that cannot be resolved: fall back to untyped
        hints = {}
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    if len(params) > 1:
        raise TypeError(
            f"{func.__qualname__}: an endpoint takes one request argument, got {len(params)}"
        )
    request_type: Any = hints.get(params[0].name, Any) if params else None
    response_type: Any = hints.get("return", Any)
    if streaming and response_type is not Any:
        args = typing.get_args(response_type)
        response_type = args[0] if args else Any
    return request_type, response_type, streaming


def endpoint(name: str | None = None) -> Callable[[F], F]:
    """Expose an async method to other services over the runtime (NATS request/reply)."""

    def decorate(func: F) -> F:
        request_type, response_type, streaming = _signature_types(func)
        spec = EndpointSpec(
            name=name or func.__name__,
            method_name=func.__name__,
            request_type=request_type,
            response_type=response_type,
            streaming=streaming,
        )
        setattr(func, ENDPOINT_ATTR, spec)
        return func

    return decorate


def api(
    path: str | None = None,
    *,
    methods: list[str] | tuple[str, ...] = ("POST",),
    stream_format: StreamFormat = "ndjson",
) -> Callable[[F], F]:
    """Expose an async method as an HTTP route on the service's own server.

    A streaming method (async generator) answers with one chunk per item: newline-delimited
    JSON by default, Server-Sent Events with `stream_format="sse"`, raw text with `"text"`.
    """
    allowed = {"GET", "POST", "PUT", "DELETE", "PATCH"}
    upper = tuple(m.upper() for m in methods)
    bad = [m for m in upper if m not in allowed]
    if bad:
        raise ValueError(f"@api: unsupported HTTP method(s) {bad}; use {sorted(allowed)}")

    def decorate(func: F) -> F:
        request_type, _, streaming = _signature_types(func)
        spec = ApiSpec(
            path=path or f"/{func.__name__}",
            methods=upper,
            method_name=func.__name__,
            request_type=request_type,
            streaming=streaming,
            stream_format=stream_format,
        )
        setattr(func, API_ATTR, spec)
        return func

    return decorate
