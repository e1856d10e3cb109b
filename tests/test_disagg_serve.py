"""Disaggregated serving for real: `dynamo serve graphs.disagg` with a decode Worker and a
PrefillWorker on the torch engine, the JetStream prefill queue and the TCP KV transfer.

The reference for every output is transformers' greedy generation, which the agg graph on the
same engine reproduces token for token (tests/test_torch_serve.py).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.serving import ServeProcess
from tests.test_kv_routing_serve import call
from tests.test_torch_engine import hf_greedy
from tests.test_torch_serve import MODEL, serve_graph

pytestmark = pytest.mark.slow

LONG = " ".join(f"word{i}" for i in range(60))  # ~120 tokens: over the 64-token threshold


@pytest.fixture(scope="module")
def disagg(
    servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    serve = serve_graph(
        servers, tmp_path_factory.mktemp("disagg"), "graphs.disagg:Frontend",
        "configs/disagg.yaml", 1, extra=["--Worker.prefill_timeout=3"],
    )  # fmt: skip
    try:
        serve.wait_for(lambda: "prefill worker ready" in serve.output(), 60, "the prefill worker")
        yield serve
    finally:
        serve.stop()


def complete(base: str, prompt: str, max_tokens: int = 12) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{base}/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def counts(servers: EmbeddedServers, component: str, endpoint: str) -> dict[str, int]:
    (only,) = call(servers, component, endpoint).values()
    return only  # type: ignore[no-any-return]


def test_outputs_match_and_only_long_prompts_go_remote(
    disagg: ServeProcess, servers: EmbeddedServers, tokenizer: Tokenizer, hf_model: Any
) -> None:
    before = counts(servers, "Worker", "disagg_stats")
    prompts = [f"{LONG} question {i}" for i in range(3)] + ["short one", "a short two"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(disagg.base, p), prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        assert answer["choices"][0]["text"] == tokenizer.decode(hf_greedy(hf_model, ids, 12))
    after = counts(servers, "Worker", "disagg_stats")
    assert after["remote"] - before["remote"] == 3
    assert after["local_short"] - before["local_short"] == 2
    assert after["fallback"] == before["fallback"]
    assert after["remote_tokens"] - before["remote_tokens"] >= 3 * 112  # 7+ blocks each
    deadline = time.monotonic() + 5  # (it counts a transfer once the receiver's ack is back)
    while counts(servers, "PrefillWorker", "stats")["prefilled"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # the decode worker computed only the tails of the remote prompts
    stats = call(servers, "Worker", "stats", EngineStats)
    assert next(iter(stats.values())).kv_usage == 0


def test_prefill_worker_killed_mid_flight_requests_still_complete(
    disagg: ServeProcess, servers: EmbeddedServers, tokenizer: Tokenizer, hf_model: Any
) -> None:
    before = counts(servers, "Worker", "disagg_stats")
    prompts = [f"survivor {i} {LONG}" for i in range(6)]  # no prefix cached anywhere yet
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, disagg.base, p) for p in prompts]
        time.sleep(0.05)
        os.kill(disagg.worker_pids("PrefillWorker:0")[-1], signal.SIGKILL)
        answers = [f.result() for f in futures]
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        assert answer["choices"][0]["text"] == tokenizer.decode(hf_greedy(hf_model, ids, 12))
    after = counts(servers, "Worker", "disagg_stats")
    went = {k: after[k] - before[k] for k in after}
    # the queue holds at most 4: beyond that the rule keeps a prefill local
    assert went["remote"] + went["local_queue_full"] == 6 and went["remote"] >= 4
    # every request either got its KV or fell back to a local prefill: none hung or failed
    stats = call(servers, "Worker", "stats", EngineStats)
    assert next(iter(stats.values())).kv_usage == 0  # no leaked blocks
    # the supervisor restarts the prefill worker; requests go remote again
    disagg.wait_for(lambda: len(disagg.worker_pids("PrefillWorker:0")) >= 2, 30, "a restart")
    disagg.wait_for(
        lambda: disagg.output().count("prefill worker ready") >= 2, 60, "the new prefill worker"
    )
    answer = complete(disagg.base, f"after the restart {LONG}")
    ids = tokenizer.encode(f"after the restart {LONG}", add_special_tokens=True)
    assert answer["choices"][0]["text"] == tokenizer.decode(hf_greedy(hf_model, ids, 12))
