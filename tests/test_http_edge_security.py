"""The HTTP edge's defences (issue 16): who may call, what a request and a connection may take.

Most tests serve `OpenAIServer` over the echo engine on a real uvicorn socket (the limits live
in uvicorn's protocol and in the edge, so an in-memory ASGI transport would skip half of
them); raw sockets speak HTTP where a client library would not misbehave on purpose. The
`served_*` tests start `dynamo serve` with the echo graph and check the same defences where
the supervisor binds the socket and the Frontend's config sets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psutil
import pytest

from dynamo_sdk.http.errors import error_response
from dynamo_sdk.http.server import ServerLimits, listen_socket, make_server
from dynamo_sdk.llm.engines.echo import EchoEngine
from dynamo_sdk.llm.frontend import EdgeSettings, OpenAIServer
from dynamo_sdk.llm.local import LocalBackend
from dynamo_sdk.llm.openai_protocol import OpenAIRequest
from dynamo_sdk.llm.protocol import TextDelta
from dynamo_sdk.llm.services.frontend import FrontendConfig
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.runtime.errors import ErrorCode, RemoteError
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from dynamo_sdk.serve.plan import build_plan
from tests.serving import REPO_ROOT, ServeProcess

MODEL = "tiny"
KEY = "sk-test-0123456789abcdef"
JSON = {"content-type": "application/json"}
COMPLETION = {"model": MODEL, "prompt": "a b c", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Edge:
    """A served `OpenAIServer`: its base URL and port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serving(
    tokenizer: Tokenizer, backend: Any = None, **settings: Any
) -> AsyncIterator[Edge]:
    """`OpenAIServer` with these `EdgeSettings` over the echo engine, on a real socket."""
    engine = EchoEngine(context_length=256)
    await engine.start()
    server = OpenAIServer(
        backend or LocalBackend(engine, tokenizer, MODEL), edge=EdgeSettings(**settings)
    )
    port = free_port()
    uv = make_server(server.app, "127.0.0.1", port)
    task = asyncio.create_task(uv.serve(sockets=[listen_socket("127.0.0.1", port)]))
    try:
        while not uv.started:
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        yield Edge(port)
    finally:
        uv.should_exit = True
        await asyncio.wait_for(task, 10)


async def exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection; everything that comes back until it is closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


def assert_short_clean_error(r: httpx.Response, status: int) -> dict[str, Any]:
    """``status``, OpenAI's error shape, a short body, and no trace of Python inside."""
    assert r.status_code == status, r.text[:500]
    assert len(r.content) < 1200, len(r.content)
    for leak in ("Traceback", "Error(", 'File "', "site-packages", "Exception"):
        assert leak not in r.text, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return dict(error)


# ---- 1. loopback by default --------------------------------------------------------------


def test_the_frontend_binds_loopback_unless_told_otherwise() -> None:
    assert FrontendConfig().host == "127.0.0.1"

    def bound(*overrides: str) -> tuple[str, int]:
        plan = build_plan(
            "graphs.agg:Frontend",
            config_file="configs/agg.yaml",
            override_args=list(overrides),
            cwd=str(REPO_ROOT),
            environ={},
        )
        return plan.http_services()["Frontend"]

    assert bound() == ("127.0.0.1", 8000)  # what `dynamo serve` binds its socket to
    assert bound("--Frontend.host=0.0.0.0") == ("0.0.0.0", 8000)


def test_dry_run_never_prints_the_api_key() -> None:
    from dynamo_sdk.serve.plan import render

    plan = build_plan(
        "graphs.agg:Frontend",
        config_file="configs/agg.yaml",
        override_args=[f"--Frontend.api_key={KEY}"],
        cwd=str(REPO_ROOT),
        environ={},
    )
    text = render(plan)
    assert KEY not in text and '"api_key": "***"' in text


# ---- 2. the API key ----------------------------------------------------------------------


async def test_api_key_required_on_openai_routes_not_on_health(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, api_key=KEY) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        missing = await c.post("/v1/completions", json=COMPLETION)
        error = assert_short_clean_error(missing, 401)
        assert error == {
            "message": error["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await c.post(
            "/v1/completions", json=COMPLETION, headers={"authorization": "Bearer nope"}
        )
        assert assert_short_clean_error(wrong, 401)["code"] == "invalid_api_key"
        assert "nope" not in wrong.text
        basic = await c.post(
            "/v1/completions", json=COMPLETION, headers={"authorization": f"Basic {KEY}"}
        )
        assert basic.status_code == 401
        for path in ("/v1/models", "/docs", "/openapi.json", "/no/such/route"):
            assert (await c.get(path)).status_code == 401, path
        good = {"authorization": f"Bearer {KEY}"}
        assert (await c.post("/v1/completions", json=COMPLETION, headers=good)).status_code == 200
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=good)).status_code == 200
        assert (await c.get("/v1/models", headers=good)).status_code == 200
        for path in ("/health", "/live", "/metrics"):
            assert (await c.get(path)).status_code == 200, path


async def test_health_can_be_protected_too(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, api_key=KEY, api_key_exempt=()) as edge:
        async with httpx.AsyncClient(base_url=edge.base) as c:
            assert (await c.get("/health")).status_code == 401
            headers = {"authorization": f"Bearer {KEY}"}
            assert (await c.get("/health", headers=headers)).status_code == 200


async def test_no_key_configured_means_none_asked_for(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tokenizer) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200
    monkeypatch.setenv("DYN_API_KEY", KEY)
    assert EdgeSettings.from_env().api_key == KEY  # what `dynamo run` and OpenAIServer() use


# ---- 3. Content-Type ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"],
)
async def test_a_generation_body_must_be_json(
    tokenizer: Tokenizer, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    async with serving(tokenizer) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        r = await c.post("/v1/completions", content=json.dumps(COMPLETION), headers=headers)
        assert "application/json" in assert_short_clean_error(r, 415)["message"]
        ok = {"content-type": "Application/JSON; charset=utf-8"}
        r = await c.post("/v1/completions", content=json.dumps(COMPLETION), headers=ok)
        assert r.status_code == 200, r.text


# ---- 4. body, prompt and message limits ------------------------------------------------


async def test_a_declared_length_over_the_limit_is_413_before_the_body(
    tokenizer: Tokenizer,
) -> None:
    async with serving(tokenizer, max_body_bytes=1024) as edge:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100000000\r\n\r\n"
        )
        began = time.monotonic()
        answer = await exchange(edge.port, head + b'{"model": ')  # the rest never comes
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert b"1024 bytes" in answer and time.monotonic() - began < 2


async def test_a_chunked_body_over_the_limit_is_413_while_reading(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, max_body_bytes=1024) as edge:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"400\r\n" + b" " * 0x400 + b"\r\n"
        answer = await exchange(edge.port, head + chunk + chunk)  # 2 KiB, no final chunk
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        body = json.dumps(COMPLETION).encode()  # under the limit, chunked: served
        small = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        answer = await exchange(edge.port, head.replace(b"1.1", b"1.0", 1) + small)
        assert b" 200 " in answer.split(b"\r\n", 1)[0], answer


async def test_a_body_that_never_finishes_is_408(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, body_timeout_s=0.5) as edge:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n"
        )
        answer = await exchange(edge.port, head + b'{"model"')
        assert answer.startswith(b"HTTP/1.1 408 "), answer


async def test_prompt_and_message_limits_before_tokenization(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, max_prompt_chars=100, max_messages=3) as edge:
        async with httpx.AsyncClient(base_url=edge.base) as c:
            long = {**COMPLETION, "prompt": "x" * 101}
            error = assert_short_clean_error(await c.post("/v1/completions", json=long), 400)
            assert error["param"] == "prompt" and "limit of 100" in error["message"]
            ids = {**COMPLETION, "prompt": [1] * 101}
            assert_short_clean_error(await c.post("/v1/completions", json=ids), 400)
            many = {**CHAT, "messages": [{"role": "user", "content": "x"}] * 4}
            error = assert_short_clean_error(await c.post("/v1/chat/completions", json=many), 400)
            assert error["param"] == "messages" and "limit of 3" in error["message"]
            parts = [{"type": "text", "text": "y" * 60}] * 2
            wide = {**CHAT, "messages": [{"role": "user", "content": parts}]}
            assert_short_clean_error(await c.post("/v1/chat/completions", json=wide), 400)
            ok = {**COMPLETION, "prompt": "x" * 100}
            assert (await c.post("/v1/completions", json=ok)).status_code == 200


# ---- 5. bad input is a clear, short 4xx ----------------------------------------------------

BIG = "9" * 5000  # past Python's 4300-digit int-to-str limit
DEEP = "[" * 100_000 + "]" * 100_000


def _completion_with(**fields: Any) -> bytes:
    return json.dumps({**COMPLETION, **fields}).encode()


def _raw_completion(tail: str) -> bytes:
    return ('{"model": "tiny", "prompt": "x", ' + tail + "}").encode()


BAD_INPUT: list[tuple[str, str, bytes]] = [
    ("int64", "/v1/completions", _completion_with(seed=2**63)),
    ("int64", "/v1/completions", _completion_with(seed=-(2**63) - 1)),
    ("int64", "/v1/completions", _completion_with(seed=10**30)),
    ("int32", "/v1/completions", _completion_with(max_tokens=2**31)),
    ("int32", "/v1/completions", _completion_with(max_completion_tokens=2**40)),
    ("int32", "/v1/completions", _completion_with(min_tokens=2**63)),
    ("int32", "/v1/completions", _completion_with(top_k=2**63)),
    ("int32", "/v1/completions", _completion_with(n=10**30)),
    ("token id", "/v1/completions", _completion_with(prompt=[1, 2**31])),
    ("token id", "/v1/completions", _completion_with(prompt=[1, 2**64])),
    ("token id", "/v1/completions", _completion_with(prompt=[-1])),
    ("digits", "/v1/completions", _raw_completion(f'"seed": {BIG}')),
    ("digits", "/v1/completions", _raw_completion(f'"max_tokens": {BIG}')),
    ("digits", "/v1/completions", ('{"model": "tiny", "prompt": [' + BIG + "]}").encode()),
    ("float", "/v1/completions", _raw_completion('"temperature": NaN')),
    ("float", "/v1/completions", _raw_completion('"top_p": Infinity')),
    ("float", "/v1/completions", _raw_completion('"repetition_penalty": 1e999')),
    ("float", "/v1/completions", _raw_completion('"frequency_penalty": -1e400')),
    ("surrogate", "/v1/completions", b'{"model": "\\ud800", "prompt": "x"}'),
    ("surrogate", "/v1/completions", b'{"model": "tiny", "prompt": "a\\udc00b"}'),
    ("surrogate", "/v1/completions", _raw_completion('"stop": ["\\ud83d"]')),
    ("surrogate", "/v1/completions", _raw_completion('"user": "\\udfff"')),
    (
        "surrogate",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
    ),
    ("utf-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xed\xa0\x80"}'),
    ("utf-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}'),
    ("nesting", "/v1/completions", DEEP.encode()),
    ("nesting", "/v1/completions", _raw_completion(f'"unknown_field": {DEEP}')),
    (
        "nesting",
        "/v1/chat/completions",
        (
            '{"model": "tiny", "messages": [{"role": "user", "content": '
            '[{"type": "text", "text": "x", "extra": ' + "[" * 200 + "]" * 200 + "}]}]}"
        ).encode(),
    ),
    (
        "nesting",
        "/v1/chat/completions",
        (
            '{"model": "tiny", "messages": [{"role": "assistant", "tool_calls": ['
            + "{" * 1
            + '"f": '
            + "[" * 5000
            + "]" * 5000
            + "}]}]}"
        ).encode(),
    ),
    (
        "echo",
        "/v1/chat/completions",
        json.dumps({**CHAT, "messages": [{"role": "x" * 100_000}]}).encode(),
    ),
]


@pytest.mark.parametrize(
    ("case", "path", "raw"), BAD_INPUT, ids=[f"{i}-{c}" for i, (c, _, _) in enumerate(BAD_INPUT)]
)
async def test_bad_input_is_a_short_clean_400(
    tokenizer: Tokenizer, case: str, path: str, raw: bytes
) -> None:
    async with serving(tokenizer) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        r = await c.post(path, content=raw, headers=JSON)
        assert_short_clean_error(r, 400)
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200


async def test_an_unknown_model_is_a_short_404_whatever_its_name(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        body = {**COMPLETION, "model": "m" * 100_000}
        error = assert_short_clean_error(await c.post("/v1/completions", json=body), 404)
        assert "m" * 200 in error["message"] and "m" * 201 not in error["message"]


def test_an_error_body_survives_lone_surrogates_and_huge_messages() -> None:
    response = error_response(404, "The model `\ud800" + "x" * 10_000 + "`", "not_found_error")
    body = json.loads(bytes(response.body))
    assert "\\ud800" in body["error"]["message"] and len(body["error"]["message"]) < 600


class _FailingBackend:
    """A backend whose every request fails with the given error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def model_names(self) -> list[str]:
        return [MODEL]

    async def wait_for_model(self, name: str, timeout: float) -> bool:
        return name == MODEL

    def generate(self, request_id: str, body: OpenAIRequest) -> AsyncIterator[TextDelta]:
        async def fail() -> AsyncIterator[TextDelta]:
            raise self.error
            yield TextDelta()  # an async generator

        return fail()


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError("secret detail in Worker 7f3a9c instance"), 500),
        (RemoteError("Worker 7f3a9c", "OSError", "boom", ErrorCode.UPSTREAM), 502),
        (
            RemoteError("Worker", "NoInstancesError", "no instance 7f3a9c", ErrorCode.UNAVAILABLE),
            503,
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_error_says_only_its_kind_and_request_id(
    tokenizer: Tokenizer,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
    status: int,
    stream: bool,
) -> None:
    async with serving(tokenizer, _FailingBackend(error)) as edge:
        async with httpx.AsyncClient(base_url=edge.base) as c:
            with caplog.at_level(logging.WARNING, logger="dynamo_sdk.llm.frontend"):
                r = await c.post("/v1/completions", json={**COMPLETION, "stream": stream})
    assert_short_clean_error(r, status)
    message = r.json()["error"]["message"]
    assert "7f3a9c" not in message and "secret" not in message and "request id cmpl-" in message
    request_id = message.rsplit("request id ", 1)[1].rstrip(")")
    assert request_id in caplog.text and "7f3a9c" in caplog.text  # the detail is in the log


# ---- 6. fields that would be ignored -----------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
UNSUPPORTED: list[tuple[str, dict[str, Any]]] = [
    ("tools", {"tools": [TOOL]}),
    ("tool_choice", {"tool_choice": "auto"}),
    ("tool_choice", {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("functions", {"functions": [TOOL["function"]]}),
    ("function_call", {"function_call": {"name": "f"}}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {}}}),
    ("logit_bias", {"logit_bias": {"50256": -100}}),
]


@pytest.mark.parametrize(("field", "extra"), UNSUPPORTED)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_field_that_would_be_ignored_is_refused_by_name(
    tokenizer: Tokenizer, field: str, extra: dict[str, Any], path: str
) -> None:
    base = CHAT if "chat" in path else COMPLETION
    async with serving(tokenizer) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        error = assert_short_clean_error(await c.post(path, json={**base, **extra}), 400)
    assert error["param"] == field and "not supported" in error["message"], error


@pytest.mark.parametrize(
    ("field", "extra"), [("suffix", {"suffix": "tail"}), ("best_of", {"best_of": 3})]
)
async def test_completion_only_fields_that_would_be_ignored(
    tokenizer: Tokenizer, field: str, extra: dict[str, Any]
) -> None:
    async with serving(tokenizer) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        r = await c.post("/v1/completions", json={**COMPLETION, **extra})
    assert assert_short_clean_error(r, 400)["param"] == field


async def test_the_no_op_values_of_those_fields_are_served(tokenizer: Tokenizer) -> None:
    no_ops = {
        "tools": [],
        "tool_choice": "none",
        "function_call": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
    }
    async with serving(tokenizer) as edge, httpx.AsyncClient(base_url=edge.base) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, **no_ops})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/completions", json={**COMPLETION, "suffix": "", "best_of": 1})
        assert r.status_code == 200, r.text


# ---- 7. timeouts and the connection cap --------------------------------------------------


async def _closed_after(
    port: int, trickle: bytes, every: float, limit: float
) -> tuple[float, bytes]:
    """Send ``trickle`` a byte every ``every`` s (then keep sending spaces); seconds until
    the server closed the connection, and what it said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    answer = b""
    try:
        i = 0
        while time.monotonic() - began < limit:
            if not writer.is_closing():
                with contextlib.suppress(ConnectionError):
                    writer.write(trickle[i : i + 1] if i < len(trickle) else b"a")
                    i += 1
            try:
                data = await asyncio.wait_for(reader.read(1000), every)
            except TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - began, answer
            if not data:
                return time.monotonic() - began, answer
            answer += data
        raise AssertionError(f"still open after {limit} s")
    finally:
        writer.close()


async def test_slowloris_headers_are_cut_off_after_the_header_timeout(
    tokenizer: Tokenizer,
) -> None:
    limits = ServerLimits(header_timeout_s=1.0)
    async with serving(tokenizer, server=limits) as edge:
        trickle = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: "
        took, answer = await _closed_after(edge.port, trickle, 0.1, 6)
        assert 0.9 < took < 3, took
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        # a connection that sends nothing at all is closed too, silently
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        began = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.9 < time.monotonic() - began < 3
        writer.close()
        # after a served request on a kept-alive connection, a trickled next one is cut too
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET /live HTTP/1.1\r\nhost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b'{"status":"live"}'), 5)
        assert first.startswith(b"HTTP/1.1 200 ")
        began = time.monotonic()
        for byte in b"GET /live HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaa":
            if writer.is_closing() or reader.at_eof():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1000), 0.1) == b"":
                    break
        assert 0.9 < time.monotonic() - began < 3
        writer.close()
        # normal traffic is not affected
        async with httpx.AsyncClient(base_url=edge.base) as c:
            assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200


async def test_oversized_headers_are_431(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, server=ServerLimits(max_header_bytes=8192)) as edge:
        big = b"GET /live HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
        assert (await exchange(edge.port, big)).startswith(b"HTTP/1.1 431 ")
        long_url = b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
        assert (await exchange(edge.port, long_url)).startswith(b"HTTP/1.1 431 ")
        fine = b"GET /live HTTP/1.1\r\nconnection: close\r\nx-ok: " + b"a" * 4000 + b"\r\n\r\n"
        assert (await exchange(edge.port, fine, wait=10)).startswith(b"HTTP/1.1 200 ")


async def test_an_idle_kept_alive_connection_is_closed(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, server=ServerLimits(keep_alive_timeout_s=1)) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET /live HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b'{"status":"live"}'), 5)
        began = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.9 < time.monotonic() - began < 3
        writer.close()


async def test_connections_over_the_cap_get_503(tokenizer: Tokenizer) -> None:
    async with serving(tokenizer, server=ServerLimits(max_connections=4)) as edge:
        idle = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(3)]
        await asyncio.sleep(0.1)  # accepted
        request = b"GET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        assert (await exchange(edge.port, request)).startswith(b"HTTP/1.1 503 ")
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.2)
        assert (await exchange(edge.port, request)).startswith(b"HTTP/1.1 200 ")


# ---- the same, served by `dynamo serve` ------------------------------------------------


@pytest.fixture(scope="module")
def served(
    servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    """The echo graph with an API key from `DYN_API_KEY` and a 1 s header timeout."""
    port = free_port()
    serve = ServeProcess(
        [
            "graphs.agg:Frontend",
            "-f",
            "configs/agg_echo.yaml",
            f"--Frontend.port={port}",
            "--Frontend.header_timeout_s=1",
        ],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_API_KEY": KEY},
        log_path=tmp_path_factory.mktemp("edge") / "serve.log",
    )
    serve.base = f"http://127.0.0.1:{port}"
    try:
        serve.wait_for(lambda: "ready: http://" in serve.output(), 90, "the echo graph")
        yield serve
    finally:
        serve.stop()


def _port(serve: ServeProcess) -> int:
    return int(serve.base.rsplit(":", 1)[1])


@pytest.mark.slow
def test_served_frontend_listens_on_loopback_and_says_so(served: ServeProcess) -> None:
    port = _port(served)
    listening = [
        c.laddr
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    out = served.output()
    assert f"OpenAI API on http://127.0.0.1:{port} (loopback only" in out
    assert "API key required" in out
    assert KEY not in out  # never logged


@pytest.mark.slow
def test_served_frontend_asks_for_the_key_from_the_environment(served: ServeProcess) -> None:
    body = {"model": "echo", "prompt": "a b", "max_tokens": 2}
    r = httpx.post(f"{served.base}/v1/completions", json=body, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(
        f"{served.base}/v1/completions", json=body, timeout=10,
        headers={"authorization": "Bearer wrong"},
    )  # fmt: skip
    assert r.status_code == 401
    assert httpx.get(f"{served.base}/health", timeout=10).status_code == 200
    good = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{served.base}/v1/completions", json=body, headers=good, timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.slow
async def test_served_frontend_cuts_off_slowloris(served: ServeProcess) -> None:
    took, _ = await _closed_after(_port(served), b"GET /health HTTP/1.1\r\nx-a: ", 0.1, 6)
    assert 0.9 < took < 3, took
