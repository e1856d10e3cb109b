"""The OpenAI-compatible HTTP edge: validation, errors, SSE, aggregation, metrics.

It knows no tokenizer and no engine. A `Backend` gives it the served models and a stream of
`TextDelta`s per request: the live models' pipelines in this process (`serving.py`: the
Frontend tokenizes and routes itself), a Processor service, or an in-process engine
(`dynamo run`). The body is validated here, once (`openai_protocol.py`). Every failure is an
OpenAI error body with a fitting status code; a client that disconnects mid-stream closes the
backend stream, which cancels the request all the way into the engine.

Ready means ready: a model is listed in `/v1/models` only while a request for it can be
served end to end, `/health` is 503 until one can (`/live` says only that the process is up),
and a request that arrives in a start-up gap waits (up to `startup_wait` seconds) for the
first worker instead of failing.

The edge's own defences (`EdgeSettings`, docs/security.md), in the order a request meets
them: an API key (`Authorization: Bearer`, compared in constant time; 401 in OpenAI's
format) on every path but the health ones; `Content-Type: application/json` on a generation
POST (415: a web page's form or `fetch` cannot post one without a CORS preflight, which
nothing here answers, so it cannot drive generations); a body-size limit (413 on the
declared `Content-Length` before a byte is read, and while reading a chunked body) and a
body read timeout (408); the body's validation (400); prompt-size and message-count limits
before tokenization (400). Every 5xx says only what kind of failure it was and the request
id; its detail goes to the log under that id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dynamo_sdk.http.errors import clip, describe, error_response, public_failure
from dynamo_sdk.http.server import ServerLimits
from dynamo_sdk.http.streaming import StreamResponse
from dynamo_sdk.llm.errors import ModelNotFoundError
from dynamo_sdk.llm.metrics import FrontendMetrics
from dynamo_sdk.llm.openai_protocol import (
    OpenAIRequest,
    RequestError,
    check_limits,
    parse_request,
)
from dynamo_sdk.llm.protocol import LogprobEntry, TextDelta, Usage
from dynamo_sdk.runtime.errors import ErrorCode, code_of

log = logging.getLogger(__name__)


class Backend(Protocol):
    def model_names(self) -> list[str]:
        """The models a request can be served for now."""
        ...

    async def wait_for_model(self, name: str, timeout: float) -> bool:
        """Whether ``name`` is servable now or becomes so within ``timeout`` (a gap)."""
        ...

    def generate(self, request_id: str, body: OpenAIRequest) -> AsyncIterator[TextDelta]: ...


API_KEY_ENV = "DYN_API_KEY"
HEALTH_PATHS = ("/health", "/live", "/livez", "/readyz", "/metrics")


@dataclass(frozen=True)
class EdgeSettings:
    """What the OpenAI edge checks before a request reaches a backend (the Frontend's config
    keys of the same names; docs/security.md says why each default).

    ``api_key`` empty: no key is asked for. ``api_key_exempt``: the paths open without one
    (the probes and metrics, so a load balancer or Prometheus needs no secret; empty it to
    protect them too). ``max_body_bytes`` (8 MiB) holds the largest prompt
    ``max_prompt_chars`` allows even with every character JSON-escaped (`\\uXXXX`, 6 bytes,
    as clients that write ASCII-only JSON send non-Latin text). ``max_prompt_chars`` (1M,
    about 250k tokens of English) is over any context served today yet bounds what one
    request can make the tokenizer do; ``max_messages`` (2048) is OpenAI's own limit.
    ``body_timeout_s``: how long reading a body may take (30 s is 8 MiB at under 300 KB/s).
    """

    api_key: str = ""
    api_key_exempt: tuple[str, ...] = HEALTH_PATHS
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0
    max_prompt_chars: int = 1_000_000
    max_messages: int = 2048
    server: ServerLimits = field(default_factory=ServerLimits)

    @classmethod
    def from_env(cls) -> EdgeSettings:
        """The defaults, with the API key `DYN_API_KEY` names (what `dynamo run` serves)."""
        return cls(api_key=os.environ.get(API_KEY_ENV, ""))


def openai_error(
    status: int, message: str, kind: str, param: str | None = None, **extra: Any
) -> JSONResponse:
    return error_response(status, message, kind, param, **extra)


def error_from_exception(exc: BaseException, request_id: str) -> JSONResponse:
    """The answer for a failed request: a client error says what was wrong; a server error
    says only its kind and the request id, and the log line with that id has the detail."""
    status, kind, message = describe(exc)
    if status < 500:
        return error_response(status, message, kind)
    if code_of(exc) is ErrorCode.INTERNAL:
        log.error("request %s failed: %s", request_id, message, exc_info=exc)
    else:
        log.warning("request %s failed (%d): %s", request_id, status, message)
    return error_response(status, public_failure(status, request_id), kind)


class _BodyRefused(Exception):
    """A body not read (whole): the answer to send instead."""

    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


_CLOSE = {"connection": "close"}  # a body left unread: the connection cannot carry another


def _media_type_ok(content_type: str | None) -> bool:
    """`application/json`, with any parameters (`; charset=utf-8`)."""
    if content_type is None:
        return False
    return content_type.partition(";")[0].strip().lower() == "application/json"


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The body, or `_BodyRefused` with a 413 as soon as it is known to exceed ``max_bytes``
    (from `Content-Length`, before a byte is read; while reading, for a chunked body), a 408
    when reading takes over ``timeout`` seconds, a 400 for a malformed `Content-Length`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not (declared.isascii() and declared.isdigit()):
            raise _BodyRefused(
                openai_error(
                    400, "bad Content-Length header", "invalid_request_error", headers=_CLOSE
                )
            )
        if len(declared) > 18 or int(declared) > max_bytes:  # (int() refuses 4300+ digits)
            raise _BodyRefused(_too_large(max_bytes))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _BodyRefused(_too_large(max_bytes))
                chunks.append(chunk)
    except TimeoutError:
        raise _BodyRefused(
            openai_error(
                408,
                f"the request body took over {timeout:g} s to arrive",
                "invalid_request_error",
                headers=_CLOSE,
            )
        ) from None
    except ClientDisconnect:
        raise _BodyRefused(Response(status_code=400)) from None  # nobody reads it
    return b"".join(chunks)


def _too_large(max_bytes: int) -> JSONResponse:
    return openai_error(
        413,
        f"request body is larger than this server's limit of {max_bytes} bytes",
        "invalid_request_error",
        headers=_CLOSE,
    )


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class _ApiKeyCheck:
    """`Authorization: Bearer <key>`, compared in constant time (of digests, so not even the
    key's length shows in the timing); the key is never logged nor echoed."""

    def __init__(self, key: str, exempt: tuple[str, ...]) -> None:
        self._digest = _digest(key.encode())
        self.exempt = frozenset(exempt)

    def refusal(self, scope: Scope) -> Response | None:
        """None when the request may pass, else the 401 to answer it with."""
        if scope.get("path", "") in self.exempt:
            return None
        given: bytes | None = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        if given is None:
            return self._unauthorized(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            _digest(token.strip()), self._digest
        ):
            return self._unauthorized("Incorrect API key provided.")
        return None

    @staticmethod
    def _unauthorized(message: str) -> JSONResponse:
        return openai_error(
            401,
            message,
            "invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


class _Accumulator:
    """Collects a stream for a non-streaming answer."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[LogprobEntry] = []
        self.finish: str | None = None
        self.usage: Usage | None = None

    def add(self, delta: TextDelta) -> None:
        self.text.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason:
            self.finish = delta.finish_reason
        if delta.usage:
            self.usage = delta.usage


def _usage_json(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode()),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                    for t in e.top
                ],
            }
            for e in entries
        ]
    }


def _completion_logprobs(entries: list[LogprobEntry], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


@dataclass
class _Call:
    """What every answer format needs to know about the request it answers."""

    kind: str  # "chat" | "completion"
    body: OpenAIRequest
    request_id: str
    created: int
    started: float

    @property
    def wants_logprobs(self) -> bool:
        return self.body.logprobs_count() is not None


class _OpenAIApp(FastAPI):
    """FastAPI, with the generation routes answered before its middleware and routing, and
    the API key checked before either (every path, routed or not, but the exempt ones)."""

    def __init__(
        self,
        generation_routes: dict[str, Any],
        api_key: _ApiKeyCheck | None,
        server_limits: ServerLimits,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.generation_routes = generation_routes
        self.api_key = api_key
        self.server_limits = server_limits  # read by `make_server` (`SERVER_LIMITS_ATTR`)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is not None:
            refusal = self.api_key.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        route = (
            self.generation_routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        )
        if route is None or scope.get("method") != "POST":
            await super().__call__(scope, receive, send)
            return
        response = await route(Request(scope, receive))
        await response(scope, receive, send)


class OpenAIServer:
    """Builds the FastAPI app around a backend."""

    def __init__(
        self,
        backend: Backend,
        metrics: FrontendMetrics | None = None,
        startup_wait: float = 60.0,
        edge: EdgeSettings | None = None,
    ) -> None:
        """``edge`` None: the defaults, with the API key from `DYN_API_KEY` if it is set."""
        self.backend = backend
        self.metrics = metrics or FrontendMetrics()
        self.startup_wait = startup_wait
        self.edge = edge if edge is not None else EdgeSettings.from_env()
        key = self.edge.api_key
        # The generation routes take the raw request and validate the body themselves, and
        # are served ahead of FastAPI's routing and middleware (`_OpenAIApp`): its dependency
        # solving and the two middleware layers that wrap every `send` of a stream cost a
        # few percent of a streamed request's CPU time.
        self.app = _OpenAIApp(
            {"/v1/chat/completions": self.chat, "/v1/completions": self.completions},
            _ApiKeyCheck(key, self.edge.api_key_exempt) if key else None,
            self.edge.server,
            title="Dynamo OpenAI-compatible API",
        )
        for path, route in self.app.generation_routes.items():
            self.app.router.routes.append(Route(path, route, methods=["POST"]))
        self.app.add_api_route("/v1/models", self.models, methods=["GET"])
        self.app.add_api_route("/health", self.health, methods=["GET"])
        self.app.add_api_route("/live", self.live, methods=["GET"])
        self.app.add_api_route("/metrics", self.prometheus, methods=["GET"])

    async def models(self) -> JSONResponse:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "dynamo"}
            for name in sorted(self.backend.model_names())
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self) -> JSONResponse:
        """200 while a request can be served end to end; 503 with why not: the backend's own
        reason (an optional ``unavailable()``: NATS is disconnected, say) or no live model
        (no worker, or no Processor in the scale-out form). ``/live`` says only that this
        process answers."""
        check = getattr(self.backend, "unavailable", None)
        problem = str(check()) if check is not None else ""
        names = self.backend.model_names()
        if problem or not names:
            return JSONResponse({"status": problem or "no models", "models": names}, 503)
        return JSONResponse({"status": "healthy", "models": names}, 200)

    async def live(self) -> JSONResponse:
        return JSONResponse({"status": "live"})

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completion")

    async def _serve(self, request: Request, kind: Literal["chat", "completion"]) -> Response:
        endpoint = "chat_completions" if kind == "chat" else "completions"
        response = await self._handle(request, kind)
        model = getattr(response, "dynamo_model", "") or ""
        self.metrics.requests.labels(endpoint, model, str(response.status_code)).inc()
        return response

    async def _handle(self, request: Request, kind: Literal["chat", "completion"]) -> Response:
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            return await self._answer(request, kind, request_id)
        except Exception as exc:  # a bug here: the client gets the request id, the log the rest
            log.error("request %s failed", request_id, exc_info=exc)
            return error_response(500, public_failure(500, request_id), "internal_error")

    async def _read(self, request: Request, kind: Literal["chat", "completion"]) -> OpenAIRequest:
        """The request's validated body, or `_BodyRefused` with the 4xx to answer instead."""
        edge = self.edge
        if not _media_type_ok(request.headers.get("content-type")):
            raise _BodyRefused(
                openai_error(
                    415,
                    "Content-Type must be application/json",
                    "invalid_request_error",
                    headers=_CLOSE,
                )
            )
        raw = await read_body(request, edge.max_body_bytes, edge.body_timeout_s)
        try:
            body = parse_request(kind, raw)
            check_limits(
                body, max_prompt_chars=edge.max_prompt_chars, max_messages=edge.max_messages
            )
        except RequestError as exc:
            raise _BodyRefused(
                openai_error(400, str(exc), "invalid_request_error", exc.param)
            ) from None
        return body

    async def _answer(
        self, request: Request, kind: Literal["chat", "completion"], request_id: str
    ) -> Response:
        try:
            body = await self._read(request, kind)
        except _BodyRefused as refused:
            return refused.response
        if body.model not in self.backend.model_names() and not await self.backend.wait_for_model(
            body.model, self.startup_wait
        ):
            return error_from_exception(
                ModelNotFoundError(
                    f"The model `{clip(body.model)}` does not exist or has no live worker."
                ),
                request_id,
            )
        started = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            stream = self.backend.generate(request_id, body)
        except Exception as exc:
            self.metrics.inflight.dec()
            return error_from_exception(exc, request_id)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = TextDelta(finish_reason="stop")
        except Exception as exc:
            self.metrics.inflight.dec()
            await _close(stream)
            return error_from_exception(exc, request_id)
        call = _Call(kind, body, request_id, int(time.time()), started)
        if body.stream:
            sse = self._sse(call, first, stream)
            response: Response = StreamResponse(sse, media_type="text/event-stream")
        else:
            try:
                response = await self._aggregate(call, first, stream)
            except Exception as exc:
                response = error_from_exception(exc, request_id)
            finally:
                self.metrics.inflight.dec()
        response.dynamo_model = body.model  # type: ignore[attr-defined]
        return response

    async def _aggregate(
        self, call: _Call, first: TextDelta, stream: AsyncIterator[TextDelta]
    ) -> JSONResponse:
        kind, body = call.kind, call.body
        acc = _Accumulator()
        acc.add(first)
        self.metrics.ttft.observe(time.perf_counter() - call.started)
        async for delta in stream:
            acc.add(delta)
        self._count_usage(acc.usage)
        text = "".join(acc.text)
        wants_logprobs = call.wants_logprobs
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": acc.finish,
                "logprobs": _chat_logprobs(acc.logprobs) if wants_logprobs else None,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": acc.finish,
                "logprobs": _completion_logprobs(acc.logprobs, 0) if wants_logprobs else None,
            }
            obj = "text_completion"
        return JSONResponse(
            {
                "id": call.request_id,
                "object": obj,
                "created": call.created,
                "model": body.model,
                "choices": [choice],
                "usage": _usage_json(acc.usage),
            }
        )

    def _count_usage(self, usage: Usage | None) -> None:
        if usage is not None:
            self.metrics.input_tokens.inc(usage.prompt_tokens)
            self.metrics.output_tokens.inc(usage.completion_tokens)

    async def _sse(
        self, call: _Call, first: TextDelta, stream: AsyncIterator[TextDelta]
    ) -> AsyncIterator[bytes]:
        kind, body, started = call.kind, call.body, call.started
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        wants_logprobs = call.wants_logprobs
        offset = 0
        last = started
        first_token = True

        # every chunk shares its id, object, created and model: encoded once per request
        encode = msgspec.json.encode
        head = b'data: {"id":%b,"object":%b,"created":%d,"model":%b,"choices":[' % (
            encode(call.request_id),
            encode(obj),
            call.created,
            encode(body.model),
        )

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
            parts = b",".join(encode(c) for c in choices)
            if usage is None:
                return head + parts + b"]}\n\n"
            return head + parts + b'],"usage":' + encode(_usage_json(usage)) + b"}\n\n"

        def choice(delta: TextDelta, role: bool) -> dict[str, Any]:
            nonlocal offset
            lp = None
            if wants_logprobs and delta.logprobs:
                lp = (
                    _chat_logprobs(delta.logprobs)
                    if kind == "chat"
                    else _completion_logprobs(delta.logprobs, offset)
                )
            if kind == "chat":
                content: dict[str, Any] = {"content": delta.text} if delta.text or role else {}
                if role:
                    content["role"] = "assistant"
                out = {
                    "index": 0,
                    "delta": content,
                    "logprobs": lp,
                    "finish_reason": delta.finish_reason,
                }
            else:
                out = {
                    "index": 0,
                    "text": delta.text,
                    "logprobs": lp,
                    "finish_reason": delta.finish_reason,
                }
            offset += len(delta.text)
            return out

        try:
            pending: TextDelta | None = first
            role_sent = False
            while True:
                if pending is None:
                    try:
                        pending = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                delta, pending = pending, None
                now = time.perf_counter()
                if delta.text:
                    if first_token:
                        self.metrics.ttft.observe(now - started)
                        first_token = False
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                if delta.usage is not None:
                    self._count_usage(delta.usage)
                    if body.include_usage():
                        yield chunk([], delta.usage)
                    continue
                if delta.text or delta.finish_reason or delta.logprobs or not role_sent:
                    yield chunk([choice(delta, role=(kind == "chat" and not role_sent))])
                    role_sent = True
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # headers are out: report in-band, as OpenAI-style servers do
            error = error_from_exception(exc, call.request_id)
            yield b"data: " + bytes(error.body) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            self.metrics.inflight.dec()
            await _close(stream)


async def _close(stream: AsyncIterator[TextDelta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # already failed; nothing more to release
            pass
