"""Lifecycle hooks: set-up, shutdown, and the health probes.

`@async_on_start` methods run once in each worker before its endpoints are registered, so a
service is never routed to before it is ready. `@async_on_shutdown` runs after in-flight
requests drained. `@liveness` / `@readiness` methods return a bool: the worker serves them on
its health port (`/livez`, `/readyz`) for the supervisor and for Kubernetes probes; a worker
whose liveness fails repeatedly is restarted, one that is not ready is withdrawn from discovery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

HOOK_ATTR = "__dynamo_hook__"
HookKind = Literal["on_start", "on_shutdown", "liveness", "readiness"]


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
