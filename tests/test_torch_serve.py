"""The project's own engine behind the real pipeline: `dynamo serve` with `engine: torch`.

The agg graph (configs/agg.yaml) answers the official openai client with the same tokens
transformers computes, batches concurrent streams and frees a departed client's blocks: in
both forms of the request path (the Frontend tokenizing and routing itself, and the
scale-out Frontend -> Processor -> Worker).
(`test_torch_routing_serve.py` runs two torch workers behind the KV router.)
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.serving import REPO_ROOT, ServeProcess, answers_a_completion
from tests.test_kv_routing_serve import call
from tests.test_torch_engine import hf_greedy

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MODEL = "dynamo-tiny"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def serve_graph(
    servers: EmbeddedServers,
    log_dir: Path,
    graph: str,
    config: str,
    workers: int,
    extra: list[str] | None = None,
) -> ServeProcess:
    port = free_port()
    serve = ServeProcess(
        [graph, "-f", config, f"--Frontend.port={port}", *(extra or [])],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_LEASE_TTL": "5"},
        log_path=log_dir / "serve.log",
    )
    base = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:  # every worker ready, and a request makes it through the pipeline
        if serve.output().count("with the torch engine") < workers:
            return False
        return answers_a_completion(base, MODEL)

    try:
        serve.wait_for(up, 120, f"{workers} torch worker(s) behind {graph}")
    except BaseException:
        serve.stop()
        raise
    serve.base = base
    return serve


@pytest.fixture(scope="module", params=["folded", "scale_out"])
def agg(
    servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory, request: Any
) -> Iterator[str]:
    extra = ["--Frontend.processor=true"] if request.param == "scale_out" else []
    serve = serve_graph(
        servers, tmp_path_factory.mktemp("agg_torch"), "graphs.agg:Frontend",
        "configs/agg.yaml", 1, extra,
    )  # fmt: skip
    try:
        yield serve.base
    finally:
        serve.stop()


@pytest.fixture
def client(agg: str) -> Any:
    return openai.OpenAI(base_url=agg, api_key="unused", max_retries=0, timeout=120)


def stats(servers: EmbeddedServers) -> EngineStats:
    (only,) = call(servers, "Worker", "stats", EngineStats).values()
    return only  # type: ignore[no-any-return]


def test_greedy_through_the_pipeline_matches_transformers(
    client: Any, tokenizer: Tokenizer, hf_model: Any
) -> None:
    for prompt in ["the model serves tokens", "hello world 東京, paged attention"]:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, **GREEDY)
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 16
        assert got.choices[0].text == tokenizer.decode(hf_greedy(hf_model, ids, 16))

    messages = [{"role": "user", "content": "who computes the KV cache?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        chat.choices[0].message.content
    )
    assert chunks[-1].usage.prompt_tokens == len(tokenizer.apply_chat_template(messages))


def test_concurrent_streams_batch_and_a_disconnect_frees_the_cache(
    client: Any, agg: str, servers: EmbeddedServers
) -> None:
    prompts = [f"request number {i} asks the torch worker" for i in range(8)]
    # Long enough answers that all eight streams overlap in the engine even when a loaded
    # 2-core machine staggers their arrival through Frontend -> Processor -> Worker (at 24
    # tokens the first streams could finish before the fourth arrived: CI saw a batch of 3).
    tokens = 160
    single = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=tokens, **GREEDY)

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=tokens, stream=True, **GREEDY
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, prompts))
    assert results[0] == single.choices[0].text  # batching leaves greedy output unchanged
    assert stats(servers).max_batch_running >= 4

    body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{agg}/completions", json=body, timeout=60) as r:
        for seen, _ in enumerate(x for x in r.iter_lines() if x.startswith("data: ")):
            if seen == 3:
                break
    deadline = time.monotonic() + 10
    while (now := stats(servers)).running or now.kv_usage:
        assert time.monotonic() < deadline, f"the abandoned request kept its blocks: {now}"
        time.sleep(0.2)
