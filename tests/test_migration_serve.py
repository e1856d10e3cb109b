"""A stream survives its worker's SIGKILL: two torch workers behind the Frontend, the one
serving a greedy stream killed mid-way; the client reads the same text it reads unbroken,
with no error and no token lost or repeated (`dynamo_sdk/llm/migration.py`).

A module of its own: graphs in one namespace share NATS subjects, so no other graph may run
beside it."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.serving import ServeProcess
from tests.test_kv_routing_serve import call
from tests.test_torch_serve import MODEL, serve_graph

pytestmark = pytest.mark.slow

MAX_TOKENS = 400


def worker_label(serve: ServeProcess, instance_id: int) -> str:
    """The supervisor's label (``Worker:1``) of the worker registered as ``instance_id``."""
    pattern = rf"\[(Worker:\d+)\][^\n]*ready: instance {instance_id:x}\b"
    (label,) = re.findall(pattern, serve.output())
    return label


def serving_worker(serve: ServeProcess, servers: EmbeddedServers) -> int:
    """The pid of the worker running a request now."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = [i for i, s in call(servers, "Worker", "stats", EngineStats).items() if s.running]
        if running:
            return serve.worker_pids(worker_label(serve, running[0]))[-1]
        time.sleep(0.05)
    raise AssertionError("no worker reported a running request")


def test_a_stream_whose_worker_is_killed_goes_on_on_another(
    servers: EmbeddedServers, tmp_path: Path
) -> None:
    serve = serve_graph(
        servers, tmp_path, "graphs.agg_router:Frontend", "configs/agg_router_torch.yaml", 2
    )
    try:
        body = {
            "model": MODEL,
            "prompt": "the stream must survive its worker " * 8,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        unbroken = httpx.post(f"{serve.base}/completions", json=body, timeout=120).json()
        assert unbroken["usage"]["completion_tokens"] == MAX_TOKENS

        text, finish, usage, killed = "", None, None, 0
        with httpx.stream(
            "POST", f"{serve.base}/completions", json={**body, "stream": True,
            "stream_options": {"include_usage": True}}, timeout=120,
        ) as response:  # fmt: skip
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    text += choice.get("text", "")
                    finish = choice.get("finish_reason") or finish
                if not killed and len(text) > 20:
                    killed = serving_worker(serve, servers)
                    os.kill(killed, signal.SIGKILL)
        assert killed, "the stream ended before a worker could be killed"
        assert finish == "length"
        assert usage is not None and usage["completion_tokens"] == MAX_TOKENS
        assert text == unbroken["choices"][0]["text"], "tokens lost or repeated across the kill"
        assert "continuing on another worker" in serve.output()
    finally:
        serve.stop()
