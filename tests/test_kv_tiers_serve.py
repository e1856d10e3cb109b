"""The disk tier survives a worker's death: `dynamo serve graphs.agg_router` with two mocker
workers on a host + disk tier, one SIGKILLed and restarted by the supervisor.

The restarted worker announces the blocks its disk kept, the Frontend's KV router credits them
(disk weight) and sends the old conversation back to it, and the worker serves it from disk.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.serving import REPO_ROOT, ServeProcess
from tests.test_kv_routing_serve import call, complete, instance_of

pytestmark = pytest.mark.slow

PREFIX = " ".join(["a long conversation about tiered caches"] * 50)


@pytest.fixture
def tiered(servers: EmbeddedServers, tmp_path: Path) -> Iterator[ServeProcess]:
    port = free_port()
    serve = ServeProcess(
        [
            "graphs.agg_router:Frontend",
            "-f",
            "configs/agg_router.yaml",
            f"--Frontend.port={port}",
            "--Worker.ServiceArgs.workers=2",
            "--Worker.speedup=50",
            "--Worker.num_blocks=512",
            "--Worker.host_kv_blocks=1024",
            "--Worker.disk_kv_blocks=4096",
            f"--Worker.disk_kv_path={tmp_path / 'kv'}",
            "--Worker.disk_kv_admission=1",
        ],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_LEASE_TTL": "3"},
        log_path=tmp_path / "serve.log",
    )
    serve.base = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        try:
            r = httpx.post(
                f"{serve.base}/completions",
                json={"model": "dynamo-mocker", "prompt": "warm", "max_tokens": 1},
                timeout=5,
            )
            return r.status_code == 200 and serve.output().count("endpoints [generate, stats") >= 2
        except httpx.HTTPError:
            return False

    try:
        serve.wait_for(up, 90, "the tiered graph")
        yield serve
    finally:
        serve.stop()


def disk(stats: EngineStats) -> tuple[int, int]:
    """(blocks on the disk tier, tokens served from it)."""
    tier = next(t for t in stats.kv_tiers if t.medium == "DISK")
    return tier.used_blocks, tier.hit_tokens


def test_a_restarted_worker_serves_its_old_prompts_from_disk_and_gets_them_routed_back(
    tiered: ServeProcess, servers: EmbeddedServers
) -> None:
    first = complete(tiered.base, PREFIX + " first question")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    deadline = time.monotonic() + 20
    while True:  # the blocks reach the disk on the worker's I/O thread
        stats = call(servers, "Worker", "stats", EngineStats)
        holders = [w for w, s in stats.items() if disk(s)[0] >= 20]
        if holders:
            break
        assert time.monotonic() < deadline, {w: disk(s) for w, s in stats.items()}
        time.sleep(0.3)
    [holder] = holders
    label = next(f"Worker:{i}" for i in range(2) if instance_of(tiered, f"Worker:{i}") == holder)
    pid = tiered.worker_pids(label)[-1]
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        pids = tiered.worker_pids(label)
        if pids[-1] == pid:
            return False
        found = re.findall(
            rf"\[{re.escape(label)}\] .*ready: instance ([0-9a-f]+)", tiered.output()
        )
        return len(found) >= 2

    tiered.wait_for(restarted, 60, f"{label} restarted")
    new_id = instance_of(tiered, label)
    assert new_id != holder
    assert "blocks from an earlier run announced" in tiered.output()
    deadline = time.monotonic() + 15
    while True:  # the dead instance's lease expires (3 s) and it leaves the router's view
        [state] = call(servers, "Frontend", "router_state", argument="dynamo-mocker").values()
        if f"{holder:x}" not in state["workers"]:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.3)

    # The restarted worker's announcement is indexed once discovery lists it: the router
    # learns the live instances from each decision, and holds events of ids it has not seen
    # there (forged ones never count), so this request's decision brings its disk blocks in.
    again = complete(tiered.base, PREFIX + " a follow-up")
    [state] = call(servers, "Frontend", "router_state", argument="dynamo-mocker").values()
    assert state["tier_blocks"].get("disk", 0) >= 20, state
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 20 * 16
    stats = call(servers, "Worker", "stats", EngineStats)
    assert disk(stats[new_id])[1] >= 20 * 16, "served from the restarted worker's disk"
