"""Lifecycle hooks: set-up, shutdown, the health probes, and a service's own HTTP app.

`@async_on_start` methods run once in each worker before its endpoints are registered, so a
service is never routed to before it is ready. `@async_on_shutdown` runs after in-flight
requests drained. `@liveness` / `@readiness` methods return a bool (a readiness method may
instead return a short string saying what is ready, "model x, 2 workers": a non-empty string
is ready, and `dynamo serve` prints it once the graph can serve): the worker serves them on
its health port (`/livez`, `/readyz`) for the supervisor and for Kubernetes probes; a worker
whose liveness fails repeatedly is restarted, one that is not ready is withdrawn from discovery.

`@http_app` marks a method that returns an ASGI application (FastAPI, Starlette): after
`@async_on_start` the worker serves it on the service's HTTP port (`port` / `host` in its
config, default 8000 on all interfaces), with the health probes added, exactly as it serves
`@api` routes; a service has one or the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

HOOK_ATTR = "__dynamo_hook__"
HookKind = Literal["on_start", "on_shutdown", "liveness", "readiness", "http_app"]


def _mark(kind: HookKind) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        setattr(func, HOOK_ATTR, kind)
        return func

    return decorate


def async_on_start(func: F) -> F:
    """Run this coroutine once per worker, before the worker takes requests."""
    return _mark("on_start")(func)


def async_on_shutdown(func: F) -> F:
    """Run this coroutine once per worker, after in-flight requests drained."""
    return _mark("on_shutdown")(func)


def liveness(func: F) -> F:
    """Mark a method (sync or async, returns bool) as the worker's liveness probe."""
    return _mark("liveness")(func)


def readiness(func: F) -> F:
    """Mark a method (sync or async, returns bool) as the worker's readiness probe."""
    return _mark("readiness")(func)


def http_app(func: F) -> F:
    """Mark a method returning an ASGI app as what the service serves on its HTTP port."""
    return _mark("http_app")(func)
