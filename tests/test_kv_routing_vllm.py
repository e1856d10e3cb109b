"""KV routing with vLLM's CPU engine: its own KV events, bridged to NATS, steer the router.

A module of its own: graphs in one namespace share NATS subjects, so the mocker graph of
test_kv_routing_serve.py (module-scoped) must be gone before this one starts.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import httpx
import pytest

from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.serving import REPO_ROOT, ServeProcess
from tests.test_kv_routing_serve import call

pytestmark = pytest.mark.slow


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_two_vllm_workers_repeated_prompt_hits_the_same_cache(
    servers: EmbeddedServers, tmp_path: Path
) -> None:
    """vLLM's own KV events (ZMQ, bridged to NATS) steer a repeated prompt back to its cache."""
    port = free_port()
    serve = ServeProcess(
        [
            "graphs.agg_router:Frontend",
            "-f",
            "configs/agg_router_vllm.yaml",
            f"--Frontend.port={port}",
        ],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_LEASE_TTL": "5", "DYN_LOG_LEVEL": "DEBUG"},
        log_path=tmp_path / "serve.log",
    )
    base = f"http://127.0.0.1:{port}/v1"

    def router_log() -> str:
        return "\n".join(x for x in serve.output().splitlines() if "dynamo.llm.router" in x)

    try:
        serve.wait_for(
            lambda: (
                serve.output().count("endpoints [generate, stats") >= 2
                and "dynamo-tiny" in _models(base)
            ),
            240,
            "two vLLM workers",
        )
        prompt = " ".join(["alpha beta gamma delta"] * 40)
        body = {"model": "dynamo-tiny", "prompt": prompt, "max_tokens": 4}
        first = httpx.post(f"{base}/completions", json=body, timeout=120).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        deadline = time.monotonic() + 10
        # the Frontend routes by KV itself (configs/agg_router_vllm.yaml): its index fills up
        while not next(iter(call(servers, "Frontend", "router_state", argument="dynamo-tiny")
                            .values()))["indexed_blocks"]:  # fmt: skip
            assert time.monotonic() < deadline, "vLLM's KV events never reached the router"
            time.sleep(0.2)
        for _ in range(3):
            again = httpx.post(f"{base}/completions", json=body, timeout=120).json()
            # vLLM itself reports the prefix-cache hit: the request went where the blocks are
            cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= 700, router_log()
    finally:
        serve.stop()


def _models(base: str) -> str:
    try:
        return httpx.get(f"{base}/models", timeout=2).text
    except httpx.HTTPError:
        return ""
