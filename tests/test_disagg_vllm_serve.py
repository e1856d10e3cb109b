"""Disaggregated serving on vLLM for real: `dynamo serve graphs.disagg` with a decode Worker and
a PrefillWorker on vLLM's CPU engine, the JetStream prefill queue, and the KV moving through
vLLM's KV-connector interface (`DynamoStorageConnector`, a shared folder).

The reference for every output is transformers' greedy generation of the same tiny model in
fp32, which aggregated vLLM reproduces on these prompts (checked by hand against vLLM's offline
`LLM.generate`; tests/test_llm_serve.py compares aggregated serving with it). One graph serves
the whole module: two vLLM engines start in it (about a minute on two cores).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest
import yaml

from dynamo_sdk.llm.disagg.queue import PrefillQueue
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.serving import REPO_ROOT, ServeProcess, answers_a_completion
from tests.test_disagg_serve import complete, counts
from tests.test_torch_engine import hf_greedy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

MODEL = "dynamo-tiny"
LONG = " ".join(f"word{i}" for i in range(60))  # ~180 tokens: over the 64-token threshold
BLOCK = 32  # configs/disagg_vllm.yaml


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv_storage")


@pytest.fixture(scope="module")
def disagg(
    servers: EmbeddedServers,
    model_dir: Path,
    storage: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeProcess]:
    """The graph on configs/disagg_vllm.yaml, its storage folder moved to a fresh one."""
    log_dir = tmp_path_factory.mktemp("disagg_vllm")
    config = yaml.safe_load((REPO_ROOT / "configs/disagg_vllm.yaml").read_text())
    for section in ("Worker", "PrefillWorker"):
        extra = config[section]["kv_transfer_config"]["kv_connector_extra_config"]
        extra["shared_storage_path"] = str(storage)
    # prefill in chunks of 64 tokens: a prompt's KV must be stored only once all of it is
    # computed (stored any earlier, the decode side would load garbage and answer differently)
    config["PrefillWorker"]["max_num_batched_tokens"] = 64
    config_path = log_dir / "disagg_vllm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    serve = ServeProcess(
        ["graphs.disagg:Frontend", "-f", str(config_path), f"--Frontend.port={port}",
         f"--Common.model={model_dir}", "--Worker.prefill_timeout=10"],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_LEASE_TTL": "5"},
        log_path=log_dir / "serve.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        out = serve.output()
        if "prefill worker ready" not in out or "with the vllm engine" not in out:
            return False
        return answers_a_completion(base, MODEL)

    try:
        serve.wait_for(up, 300, "two vLLM workers behind graphs.disagg")
        serve.base = base
        yield serve
    finally:
        serve.stop()


def expected(tokenizer: Tokenizer, hf_model: Any, prompt: str) -> str:
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    return tokenizer.decode(hf_greedy(hf_model, ids, 12))


def in_group(pgid: int) -> list[int]:
    """Processes still in a process group (a killed worker's session)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def queue_depth(servers: EmbeddedServers) -> int:
    """Prefill requests in the JetStream queue, not yet acknowledged."""

    async def go() -> int:
        nc = await nats.connect(servers.nats.url)
        try:
            return await PrefillQueue(nc, "dynamo").depth()
        finally:
            await nc.close()

    return asyncio.run(go())


def leftovers(storage: Path) -> list[Path]:
    """Transfer folders still in storage (a decode worker's own folder may stay, empty)."""
    return [t for inst in storage.iterdir() if inst.is_dir() for t in inst.iterdir()]


def test_long_prompts_go_remote_through_the_connector_and_match_greedy(
    disagg: ServeProcess,
    servers: EmbeddedServers,
    tokenizer: Tokenizer,
    hf_model: Any,
    storage: Path,
) -> None:
    before = counts(servers, "Worker", "disagg_stats")
    sent_before = counts(servers, "PrefillWorker", "stats")
    # distinct first words: no prompt's blocks are cached on the decode side by another one
    prompts = [f"question {i} {LONG}" for i in range(3)] + ["short one", "a short two"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(disagg.base, p), prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer["choices"][0]["text"] == expected(tokenizer, hf_model, prompt)
    after = counts(servers, "Worker", "disagg_stats")
    went = {k: after[k] - before[k] for k in after}
    assert went["remote"] == 3 and went["local_short"] == 2
    assert went["fallback"] == 0 and went["remote_unloaded"] == 0
    # every long prompt's KV but its last partial block came through the connector
    stored = [
        (len(tokenizer.encode(p, add_special_tokens=True)) - 1) // BLOCK * BLOCK
        for p in prompts[:3]
    ]
    assert went["remote_tokens"] == sum(stored) and min(stored) >= 5 * BLOCK
    for answer, tokens in zip(answers, stored, strict=False):
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == tokens
    sent = counts(servers, "PrefillWorker", "stats")
    assert sent["via_connector"] - sent_before["via_connector"] == 3
    assert sent["tokens_sent"] - sent_before["tokens_sent"] == sum(stored)
    # each transfer's files went once its request finished
    assert leftovers(storage) == []


def test_prefill_worker_killed_mid_flight_requests_complete_and_storage_is_cleaned(
    disagg: ServeProcess,
    servers: EmbeddedServers,
    tokenizer: Tokenizer,
    hf_model: Any,
    storage: Path,
) -> None:
    before = counts(servers, "Worker", "disagg_stats")
    prompts = [f"survivor {i} {LONG}" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, disagg.base, p) for p in prompts]
        time.sleep(0.05)
        killed = disagg.worker_pids("PrefillWorker:0")[-1]
        os.kill(killed, signal.SIGKILL)
        answers = [f.result() for f in futures]
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer["choices"][0]["text"] == expected(tokenizer, hf_model, prompt)
    after = counts(servers, "Worker", "disagg_stats")
    went = {k: after[k] - before[k] for k in after}
    assert went["remote"] + went["local_queue_full"] == 4 and went["remote"] >= 1
    assert went["fallback"] >= 1  # the dead worker's prefills were computed locally
    assert leftovers(storage) == []  # what it may have half written went with the fallback
    # the supervisor restarts it (and killed what the dead one left running)
    disagg.wait_for(lambda: len(disagg.worker_pids("PrefillWorker:0")) >= 2, 30, "a restart")
    assert not in_group(killed)  # its vLLM engine core did not outlive it
    disagg.wait_for(
        lambda: disagg.output().count("prefill worker ready") >= 2, 240, "the new prefill worker"
    )
    # the prefills the dead worker held come back from the queue after their ack wait; the
    # new worker runs them and its notices are refused (nobody waits any more): once the queue
    # is empty, long prompts go remote again
    disagg.wait_for(lambda: queue_depth(servers) == 0, 60, "the prefill queue to drain")
    prompt = f"after the restart {LONG}"
    answer = complete(disagg.base, prompt)
    assert answer["choices"][0]["text"] == expected(tokenizer, hf_model, prompt)
    final = counts(servers, "Worker", "disagg_stats")
    assert final["remote"] == after["remote"] + 1 and final["fallback"] == after["fallback"]
    # what the redelivered prefills stored went when their notices were refused
    disagg.wait_for(lambda: leftovers(storage) == [], 30, "no stored KV left")


def test_graph_stops_cleanly(disagg: ServeProcess) -> None:
    """SIGINT drains both vLLM workers: they exit 0 by themselves, nothing is killed."""
    assert disagg.interrupt(timeout=60) == 0
    out = disagg.output()
    for label in ("Worker:0", "PrefillWorker:0"):
        assert f"{label} exited with code 0" in out
    assert "killing them" not in out
