"""Two workers on the project's own engine behind the KV-aware router (a module of its own:
graphs in one namespace share NATS subjects, so no other graph may run beside it)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.test_kv_routing_serve import call
from tests.test_torch_serve import MODEL, serve_graph

pytestmark = pytest.mark.slow


def test_repeated_prompt_returns_to_the_worker_holding_its_blocks(
    servers: EmbeddedServers, tmp_path: Path
) -> None:
    serve = serve_graph(
        servers, tmp_path, "graphs.agg_router:Frontend", "configs/agg_router_torch.yaml", 2
    )
    try:
        prompt = " ".join(["alpha beta gamma delta"] * 40)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        first = httpx.post(f"{serve.base}/completions", json=body, timeout=60).json()
        prompt_tokens = first["usage"]["prompt_tokens"]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        deadline = time.monotonic() + 10
        # the Frontend routes by KV itself (configs/agg_router_torch.yaml): its index fills up
        state = call(servers, "Frontend", "router_state", argument=MODEL)
        while not next(iter(state.values()))["indexed_blocks"]:
            assert time.monotonic() < deadline, "the torch workers' KV events never arrived"
            time.sleep(0.2)
            state = call(servers, "Frontend", "router_state", argument=MODEL)
        for _ in range(3):
            again = httpx.post(f"{serve.base}/completions", json=body, timeout=60).json()
            # the engine itself reports the hit: all full blocks but the last were reused
            cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == (prompt_tokens - 1) // 16 * 16
    finally:
        serve.stop()
