"""The agg graph served for real: `dynamo serve`, vLLM's CPU engine, the official openai client.

One graph is started for the module (vLLM takes ~30 s to start here); the tests share it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.conftest import settings_for
from tests.serving import REPO_ROOT, ServeProcess

openai = pytest.importorskip("openai")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

MODEL = "dynamo-tiny"


@pytest.fixture(scope="module")
def served(
    servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    port = free_port()
    serve = ServeProcess(
        [
            "graphs.agg:Frontend",
            "-f",
            "configs/agg_vllm.yaml",
            f"--Frontend.port={port}",
            "--Worker.max_num_seqs=32",
        ],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_LEASE_TTL": "5"},
        log_path=tmp_path_factory.mktemp("agg") / "serve.log",
    )
    base = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        try:
            return MODEL in httpx.get(f"{base}/models", timeout=2).text
        except httpx.HTTPError:
            return False

    try:
        serve.wait_for(up, 240, "the agg graph to list its model")
        serve.base = base
        yield serve
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def graph(served: ServeProcess) -> str:
    return served.base


@pytest.fixture
def client(graph: str) -> Any:
    return openai.OpenAI(base_url=graph, api_key="unused", max_retries=0, timeout=120)


def worker_stats(servers: EmbeddedServers) -> EngineStats:
    async def fetch() -> EngineStats:
        rt = await DistributedRuntime.connect(settings_for(servers))
        try:
            client = rt.endpoint_client("dynamo", "Worker", "stats", response_type=EngineStats)
            return await client("now")
        finally:
            await rt.shutdown()

    return asyncio.run(fetch())


GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_chat_and_completions_stream_and_not(client: Any, tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hello, who serves the tokens?"}]
    prompt_len = len(tokenizer.apply_chat_template(messages))

    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == prompt_len
    assert chat.usage.completion_tokens == 12
    assert chat.usage.total_tokens == prompt_len + 12

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12

    prompt = "the router sends each request"
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, **GREEDY)
    assert comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 7
    assert comp.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=True))
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=7, stream=True, **GREEDY
        )
        if c.choices
    )
    assert streamed == comp.choices[0].text


def test_greedy_matches_vllm_offline(client: Any, tokenizer: Tokenizer, model_dir: Path) -> None:
    prompts = ["the model serves tokens", "hello world 東京"]
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_sdk.llm.testing.vllm_reference",
            str(model_dir),
            json.dumps(ids),
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    line = next(x for x in ref.stdout.splitlines() if x.startswith("REFERENCE "))
    expected = json.loads(line[len("REFERENCE ") :])
    for prompt, want in zip(prompts, expected, strict=True):
        got = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, logprobs=0, **GREEDY
        )
        assert got.choices[0].text == tokenizer.decode(want)
        assert len(got.choices[0].logprobs.tokens) == 16


def test_stop_string_is_honoured(client: Any) -> None:
    prompt = "streaming latency throughput batch"
    full = (
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, **GREEDY)
        .choices[0]
        .text
    )
    assert len(full) > 6
    stop = full[3:6]
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, stop=[stop], **GREEDY
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_are_batched(client: Any, servers: EmbeddedServers) -> None:
    prompts = [f"request number {i} asks the worker" for i in range(16)]
    singles = {
        p: client.completions.create(model=MODEL, prompt=p, max_tokens=20, **GREEDY).choices[0].text
        for p in prompts[:2]
    }

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=20, stream=True, **GREEDY
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, prompts))
    assert all(len(r) > 0 for r in results)
    for prompt, text in zip(prompts, results, strict=True):
        if prompt in singles:
            assert text == singles[prompt]  # batching does not change greedy output
    assert worker_stats(servers).max_batch_running > 1


def test_bad_inputs_get_openai_errors(client: Any, graph: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hello " * 2100, max_tokens=2)
    assert "maximum context length" in str(info.value)
    r = httpx.post(
        f"{graph}/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_disconnect_mid_stream_frees_the_engine(graph: str, servers: EmbeddedServers) -> None:
    body = {
        "model": MODEL,
        "prompt": "a long answer",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{graph}/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen == 3:
                break
    assert worker_stats(servers).running <= 1
    deadline = time.monotonic() + 10
    while worker_stats(servers).running != 0:
        assert time.monotonic() < deadline, "the engine kept running the abandoned request"
        time.sleep(0.2)
    stats = worker_stats(servers)
    assert stats.generation_tokens_total < 1500 * 2


def test_models_follow_workers(servers: EmbeddedServers, graph: str, tmp_path: Path) -> None:
    """A second model appears with its worker and disappears when that worker dies (kill -9)."""
    extra = ServeProcess(
        [
            "graphs.agg:Worker",
            "-f",
            "configs/agg_echo.yaml",
            "--Common.served_model_name=echo-extra",
        ],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_LEASE_TTL": "5"},
        log_path=tmp_path / "extra.log",
    )

    def names() -> list[str]:
        return [m["id"] for m in httpx.get(f"{graph}/models", timeout=5).json()["data"]]

    try:
        extra.wait_for(lambda: "echo-extra" in names(), 60, "echo-extra to be listed")
        assert MODEL in names()
        [worker_pid] = extra.worker_pids("Worker:0")
        os.kill(extra.proc.pid, signal.SIGKILL)  # no supervisor left to restart it
        os.kill(worker_pid, signal.SIGKILL)
        started = time.monotonic()
        while "echo-extra" in names():
            assert time.monotonic() - started < 5 + 5, "model outlived its worker's lease"
            time.sleep(0.2)
        assert names() == [MODEL]
    finally:
        extra.stop()


def test_worker_reports_load_in_logs_and_prometheus(client: Any, served: ServeProcess) -> None:
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="load", max_tokens=64, **GREEDY)
    served.wait_for(
        lambda: "generation" in served.output() and "tok/s" in served.output(), 30, "a load line"
    )
    line = next(x for x in served.output().splitlines() if "tok/s, generation" in x)
    assert line.startswith("[Worker:0]")
    for part in ("running", "waiting", "KV cache", "Prefix cache hit rate: GPU: "):
        assert part in line
    metrics = httpx.get(
        f"http://127.0.0.1:{served.health_port('Worker:0')}/metrics", timeout=5
    ).text
    assert 'dynamo_worker_running_requests{model="dynamo-tiny"}' in metrics
    assert "dynamo_worker_generation_tokens_per_second" in metrics
