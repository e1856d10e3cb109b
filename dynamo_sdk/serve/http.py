"""The HTTP edge of a worker: `@api` routes and the health probes, on FastAPI/uvicorn.

Every worker serves `/livez` and `/readyz` (Kubernetes-style probes, also what the supervisor
polls); a service with `@api` methods also serves them as routes on its configured port.
Errors are JSON (`{"error": {"message", "type", "code"}}`) with a fitting status, never a
traceback: a body that does not match the route's type is 422, a downstream service with no
live instance 503, an error raised downstream 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from dynamo_sdk.runtime import codec
from dynamo_sdk.runtime.errors import DynamoError, NoInstancesError, RemoteError
from dynamo_sdk.sdk.endpoint import ApiSpec

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]


class StreamResponse(Response):
    """A streamed body from an async iterator of bytes, sent from the request's own task.

    Starlette's `StreamingResponse`, on servers of ASGI spec < 2.4 (uvicorn), runs the body in
    an anyio task group beside a disconnect listener; building that before the first chunk
    cost ~0.4 ms of a streamed request's time to first token. Here a plain task listens for
    the client to leave while the request's own task sends: if it leaves, the sending task is
    cancelled (the body iterator sees `CancelledError` at its
    current await, or `GeneratorExit` at a `yield`, so the request upstream is closed), as
    with Starlette. The body iterator is always closed before the response returns.
    """

    def __init__(
        self, content: AsyncIterator[bytes], status_code: int = 200, media_type: str | None = None
    ) -> None:
        self.body_iterator = content
        self.status_code = status_code
        if media_type is not None:
            self.media_type = media_type
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        finished = False  # the body is complete: a disconnect needs no cancelling now
        gone = False  # the client left and the sending task was cancelled for it

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:
                gone = True
                task.cancel("client disconnected")

        watcher: asyncio.Task[None] | None = None
        body = self.body_iterator
        try:
            start = {"status": self.status_code, "headers": self.raw_headers}
            await send({"type": "http.response.start", **start})
            # Listening from the start (a plain task costs microseconds): a client that leaves
            # while its request still waits for a first token must cancel it too.
            watcher = asyncio.get_running_loop().create_task(watch())
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
        finally:
            finished = True
            if watcher is not None:
                watcher.cancel()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


def _status_for(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, NoInstancesError):
        return 503, "service_unavailable"
    if isinstance(exc, RemoteError):
        return 502, "upstream_error"
    if isinstance(exc, DynamoError):
        return 502, "runtime_error"
    if isinstance(exc, (ValueError, TypeError)):
        return 400, "invalid_request_error"
    return 500, "internal_error"


def add_health_routes(app: FastAPI, live: Probe, ready: Probe) -> None:
    async def livez() -> Response:
        ok = await live()
        return JSONResponse({"status": "ok" if ok else "failing"}, 200 if ok else 503)

    async def readyz() -> Response:
        ok = await ready()
        return JSONResponse({"status": "ready" if ok else "not ready"}, 200 if ok else 503)

    app.add_api_route("/livez", livez, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", _prometheus, methods=["GET"], include_in_schema=False)


async def _prometheus() -> Response:
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
                status, kind = _status_for(exc)
                return error_response(status, str(exc), kind)
            return JSONResponse(codec.to_builtins(result))
        stream: AsyncIterator[Any] = call
        # Pull the first item before answering, so an early failure gets a real status code.
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return StreamingResponse(iter(()), media_type=_media_type(spec.stream_format))
        except Exception as exc:
            status, kind = _status_for(exc)
            return error_response(status, str(exc), kind)
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
        status, kind = _status_for(exc)
        log.warning("stream failed after it started: %s", exc)
        yield _format_chunk({"error": {"message": str(exc), "type": kind, "code": status}}, fmt)
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so all workers of an @api service share its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the worker's own event loop: the worker, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(app: FastAPI, host: str, port: int) -> EmbeddedUvicorn:
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
    )
    return EmbeddedUvicorn(config)


def bind_api_methods(app: FastAPI, instance: Any, specs: list[ApiSpec]) -> None:
    for spec in specs:
        method = getattr(instance, spec.method_name)
        if not (inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)):
            raise TypeError(f"@api method {spec.method_name} must be async")
        add_api_route(app, spec, method)
