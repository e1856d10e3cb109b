"""The OpenAI edge and the Processor, in one process over the echo engine (no servers).

The echo engine returns the prompt's own tokens, so every expectation here is computable:
text, token counts, finish reasons, and where stop strings must cut.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from dynamo_sdk.http.server import listen_socket, make_server
from dynamo_sdk.llm.engines.echo import EchoEngine
from dynamo_sdk.llm.frontend import OpenAIServer
from dynamo_sdk.llm.local import LocalBackend
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.serve.embedded import free_port

MODEL = "tiny"


@pytest.fixture
async def client(tokenizer: Tokenizer) -> AsyncIterator[httpx.AsyncClient]:
    engine = EchoEngine(context_length=256)
    await engine.start()
    server = OpenAIServer(LocalBackend(engine, tokenizer, MODEL))
    transport = httpx.ASGITransport(app=server.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def sse_events(body: str) -> list[str]:
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


async def test_completion_echoes_exact_usage(
    client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    prompt = "one two three four"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == tokenizer.decode(ids[:5])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 5,
        "total_tokens": len(ids) + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_chat_stops_on_eos_with_finish_stop(
    client: httpx.AsyncClient, tokenizer: Tokenizer
) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hello 東京 🙂"},
    ]
    prompt = tokenizer.render_chat(messages)
    start, end = prompt.latest_message or (0, 0)
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    # the echo answers with the latest message, then an EOS id: a natural stop
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "hello 東京 🙂"
    assert body["usage"]["completion_tokens"] == end - start + 1
    assert body["usage"]["prompt_tokens"] == len(prompt.token_ids)


async def test_chat_ignore_eos_and_min_tokens(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "ignore_eos": True, "max_tokens": 40},
    )
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 40


async def test_stream_with_usage_and_done(client: httpx.AsyncClient, tokenizer: Tokenizer) -> None:
    prompt = "streaming latency throughput"
    r = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    echoed = [ids[i % len(ids)] for i in range(6)]  # the echo engine cycles through the prompt
    assert text == tokenizer.decode(echoed)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_chat_stream_starts_with_role(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[-1]  # not asked for


@pytest.mark.parametrize("chunked", [False, True])
async def test_stop_string_across_token_boundaries(
    client: httpx.AsyncClient, tokenizer: Tokenizer, chunked: bool
) -> None:
    prompt = "the router sends each request to the worker"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    pieces = [tokenizer.decode([i]) for i in ids]
    # a stop string that starts inside one token and ends inside a later one
    full = "".join(pieces)
    start = full.index("sends") + 2
    stop = full[start : start + 9]  # "nds each "
    assert len({tokenizer.decode([i]) for i in ids}) > 1
    r = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 40,
            "stop": [stop],
            "stream": chunked,
        },
    )
    if chunked:
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    else:
        text = r.json()["choices"][0]["text"]
        finish = r.json()["choices"][0]["finish_reason"]
    assert text == full[:start]
    assert finish == "stop"


async def test_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "ab"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 1,
        },
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert all(entry["logprob"] == 0.0 for entry in content)
    assert all(entry["top_logprobs"][0]["token"] == entry["token"] for entry in content)
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 2, "logprobs": 1}
    )
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 2 and lp["text_offset"][0] == 0


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        400,
        None,
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        400,
        "stream",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 300}, 400, None),  # > context
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1000}, 400, None),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "min_tokens": 9, "max_tokens": 3},
        400,
        None,
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
async def test_bad_input_gets_openai_error(
    client: httpx.AsyncClient, path: str, body: object, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    if param is not None:
        assert error["param"] and error["param"].startswith(param)


async def test_context_error_message(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1000}
    )
    assert "maximum context length is 256" in r.json()["error"]["message"]


async def test_models_health_metrics(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.json() == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "dynamo"}],
    }
    assert (await client.get("/health")).status_code == 200
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 2})
    metrics = (await client.get("/metrics")).text
    assert (
        'dynamo_frontend_requests_total{endpoint="completions",model="tiny",status="200"}'
        in metrics
    )
    assert "dynamo_frontend_output_tokens_total 2.0" in metrics


async def test_client_disconnect_stops_engine(tokenizer: Tokenizer) -> None:
    """Over a real socket: closing the connection mid-stream aborts the request in the engine."""
    slow = EchoEngine(context_length=256, token_delay=0.02)
    await slow.start()
    server = OpenAIServer(LocalBackend(slow, tokenizer, MODEL))
    port = free_port()
    sock = listen_socket("127.0.0.1", port)
    uv = make_server(server.app, "127.0.0.1", port)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        while not uv.started:
            await asyncio.sleep(0.01)
        body = {
            "model": MODEL,
            "prompt": "a b c",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        async with httpx.AsyncClient() as http:
            async with http.stream(
                "POST", f"http://127.0.0.1:{port}/v1/completions", json=body
            ) as r:
                async for _line in r.aiter_lines():
                    assert slow.stats().running == 1
                    break
        for _ in range(100):
            if slow.stats().running == 0:
                break
            await asyncio.sleep(0.02)
        assert slow.stats().running == 0
        assert slow.stats().generation_tokens_total < 200
    finally:
        uv.should_exit = True
        await task
