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
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dynamo_sdk.http.errors import describe, error_response
from dynamo_sdk.http.streaming import StreamResponse
from dynamo_sdk.llm.errors import ModelNotFoundError
from dynamo_sdk.llm.metrics import FrontendMetrics
from dynamo_sdk.llm.openai_protocol import OpenAIRequest, RequestError, parse_request
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


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return error_response(status, message, kind, param)


def error_from_exception(exc: BaseException) -> JSONResponse:
    status, kind, message = describe(exc)
    if status >= 500 and code_of(exc) is ErrorCode.INTERNAL:
        log.error("request failed: %s", message, exc_info=exc)
    return error_response(status, message, kind)


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
    """FastAPI, with the generation routes answered before its middleware and routing."""

    def __init__(self, generation_routes: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generation_routes = generation_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
    ) -> None:
        self.backend = backend
        self.metrics = metrics or FrontendMetrics()
        self.startup_wait = startup_wait
        # The generation routes take the raw request and validate the body themselves, and
        # are served ahead of FastAPI's routing and middleware (`_OpenAIApp`): its dependency
        # solving and the two middleware layers that wrap every `send` of a stream cost a
        # few percent of a streamed request's CPU time.
        self.app = _OpenAIApp(
            {"/v1/chat/completions": self.chat, "/v1/completions": self.completions},
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
        names = self.backend.model_names()
        status = 200 if names else 503
        return JSONResponse(
            {"status": "healthy" if names else "no models", "models": names}, status
        )

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
        try:
            body = parse_request(kind, await request.body())
        except RequestError as exc:
            return openai_error(400, str(exc), "invalid_request_error", exc.param)
        if body.model not in self.backend.model_names() and not await self.backend.wait_for_model(
            body.model, self.startup_wait
        ):
            return error_from_exception(
                ModelNotFoundError(
                    f"The model `{body.model}` does not exist or has no live worker."
                )
            )
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        started = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            stream = self.backend.generate(request_id, body)
        except Exception as exc:
            self.metrics.inflight.dec()
            return error_from_exception(exc)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = TextDelta(finish_reason="stop")
        except Exception as exc:
            self.metrics.inflight.dec()
            await _close(stream)
            return error_from_exception(exc)
        call = _Call(kind, body, request_id, int(time.time()), started)
        if body.stream:
            sse = self._sse(call, first, stream)
            response: Response = StreamResponse(sse, media_type="text/event-stream")
        else:
            try:
                response = await self._aggregate(call, first, stream)
            except Exception as exc:
                response = error_from_exception(exc)
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
            error = error_from_exception(exc)
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
