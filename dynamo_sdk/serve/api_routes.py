"""A worker's HTTP routes: its `@api` methods and the health probes, on FastAPI.

Every worker serves `/livez` and `/readyz` (Kubernetes-style probes, also what the supervisor
polls); a service with `@api` methods also serves them as routes on its configured port.
Errors are JSON (`dynamo_sdk.http.errors`) with a fitting status, never a traceback: a body
that does not match the route's type is 422, a plain `ValueError`/`TypeError` 400, and any
other error the status of its `ErrorCode` (a downstream service with no live instance 503,
an error raised downstream keeps the code its service gave it).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.applications import Starlette
from starlette.routing import Route

from dynamo_sdk.http.errors import describe, error_body, error_response
from dynamo_sdk.http.streaming import StreamResponse
from dynamo_sdk.runtime import codec
from dynamo_sdk.runtime.errors import CodedError
from dynamo_sdk.sdk.endpoint import ApiSpec

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]


def _describe(exc: BaseException) -> tuple[int, str, str]:
    """(status, type, message); a plain ValueError/TypeError of the route's own is the
    caller's mistake (a 400), anything else answers with its error code's status."""
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, CodedError):
        return 400, "invalid_request_error", str(exc)
    return describe(exc)


def _error(exc: BaseException) -> JSONResponse:
    status, kind, message = _describe(exc)
    return error_response(status, message, kind)


Readiness = tuple[bool, str]  # ready?, and what is ready ("model x, 2 workers") when it is
ReadyProbe = Callable[[], Awaitable[Readiness]]


def add_health_routes(
    app: Starlette, live: Probe, ready: ReadyProbe, *, metrics: bool = True
) -> None:
    """`/livez`, `/readyz` (with what is ready, when it is) and, unless the app has its own,
    `/metrics` (the process's default Prometheus registry)."""

    async def livez(_: Request) -> Response:
        ok = await live()
        return JSONResponse({"status": "ok" if ok else "failing"}, 200 if ok else 503)

    async def readyz(_: Request) -> Response:
        ok, detail = await ready()
        body = {"status": "ready" if ok else "not ready", "detail": detail}
        return JSONResponse(body, 200 if ok else 503)

    routes = [("/livez", livez), ("/readyz", readyz)]
    if metrics:
        routes.append(("/metrics", _prometheus))
    for path, endpoint in routes:
        app.router.routes.append(Route(path, endpoint, methods=["GET"], include_in_schema=False))


async def _prometheus(_: Request) -> Response:
    """The process's default Prometheus registry (what services register metrics in)."""
    try:
        from prometheus_client import REGISTRY, generate_latest
    except ImportError:
        return Response("prometheus_client is not installed\n", 404, media_type="text/plain")
    return Response(generate_latest(REGISTRY), media_type="text/plain; version=0.0.4")


def _decoder(tp: Any) -> Callable[[bytes], Any]:
    if tp is None:
        return lambda _body: None
    if hasattr(tp, "model_validate_json"):
        return tp.model_validate_json
    dec = msgspec.json.Decoder(Any if tp is Any else tp)
    return dec.decode


def _format_chunk(item: Any, fmt: str) -> bytes:
    if fmt == "text":
        return (
            item.encode() if isinstance(item, str) else json.dumps(codec.to_builtins(item)).encode()
        )
    body = json.dumps(codec.to_builtins(item))
    if fmt == "sse":
        return f"data: {body}\n\n".encode()
    return (body + "\n").encode()


def _media_type(fmt: str) -> str:
    return {"sse": "text/event-stream", "text": "text/plain"}.get(fmt, "application/x-ndjson")


def add_api_route(app: FastAPI, spec: ApiSpec, method: Callable[..., Any]) -> None:
    """Serve one `@api` method: decode the body (or query), stream or return the answer."""
    decode = _decoder(spec.request_type)
    takes_arg = spec.request_type is not None

    async def parse(request: Request) -> Any:
        if not takes_arg:
            return None
        if request.method == "GET":
            query = dict(request.query_params)
            if spec.request_type is Any:
                return query
            return msgspec.convert(query, spec.request_type, strict=False)
        return decode(await request.body())

    async def route(request: Request) -> Response:
        try:
            arg = await parse(request)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            return error_response(422, f"invalid request body: {exc}", "invalid_request_error")
        call = method(arg) if takes_arg else method()
        if not spec.streaming:
            try:
                result = await call
            except Exception as exc:
                return _error(exc)
            return JSONResponse(codec.to_builtins(result))
        stream: AsyncIterator[Any] = call
        # Pull the first item before answering, so an early failure gets a real status code.
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return StreamingResponse(iter(()), media_type=_media_type(spec.stream_format))
        except Exception as exc:
            return _error(exc)
        return StreamResponse(
            _chunks(first, stream, spec.stream_format), media_type=_media_type(spec.stream_format)
        )

    app.add_api_route(spec.path, route, methods=list(spec.methods), name=spec.method_name)


async def _chunks(first: Any, rest: AsyncIterator[Any], fmt: str) -> AsyncIterator[bytes]:
    try:
        yield _format_chunk(first, fmt)
        async for item in rest:
            yield _format_chunk(item, fmt)
    except Exception as exc:  # headers are sent: report in-band, then end the stream
        status, kind, message = _describe(exc)
        log.warning("stream failed after it started: %s", exc)
        yield _format_chunk(error_body(status, message, kind), fmt)
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def bind_api_methods(app: FastAPI, instance: Any, specs: list[ApiSpec]) -> None:
    for spec in specs:
        method = getattr(instance, spec.method_name)
        if not (inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)):
            raise TypeError(f"@api method {spec.method_name} must be async")
        add_api_route(app, spec, method)
