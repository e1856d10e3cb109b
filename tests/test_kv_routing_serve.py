"""KV-aware routing end to end: `dynamo serve graphs.agg_router` with three mocker workers.

Both forms of the graph: the Frontend routing by KV itself (the default), and the scale-out
path (Frontend → Processor → Router service → Worker).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.conftest import settings_for
from tests.serving import REPO_ROOT, ServeProcess

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MODEL = "dynamo-mocker"
PREFIX = " ".join(["shared system prompt about routing"] * 60)


FORMS = {"folded": [], "scale_out": ["--Frontend.processor=true"]}


@pytest.fixture(scope="module", params=list(FORMS))
def routed(
    servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory, request: Any
) -> Iterator[ServeProcess]:
    port = free_port()
    serve = ServeProcess(
        [
            "graphs.agg_router:Frontend",
            "-f",
            "configs/agg_router.yaml",
            f"--Frontend.port={port}",
            "--Worker.speedup=50",
            *FORMS[request.param],
        ],
        cwd=REPO_ROOT,
        env={**servers.env(), "DYN_LEASE_TTL": "3"},
        log_path=tmp_path_factory.mktemp("routed") / "serve.log",
    )
    serve.base = f"http://127.0.0.1:{port}/v1"
    serve.form = request.param  # type: ignore[attr-defined]

    def up() -> bool:
        try:
            r = httpx.post(
                f"{serve.base}/completions",
                json={"model": MODEL, "prompt": "warm", "max_tokens": 1},
                timeout=5,
            )
            return r.status_code == 200 and serve.output().count("endpoints [generate, stats") >= 3
        except httpx.HTTPError:
            return False

    try:
        serve.wait_for(up, 90, "the routed graph")
        yield serve
    finally:
        serve.stop()


def complete(base: str, prompt: str) -> dict[str, Any]:
    """One completion through the official openai client."""
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    return answer.model_dump()  # type: ignore[no-any-return]


def call(
    servers: EmbeddedServers,
    component: str,
    endpoint: str,
    response_type: Any = Any,
    argument: Any = "now",
) -> Any:
    async def go() -> dict[int, Any]:
        rt = await DistributedRuntime.connect(settings_for(servers))
        try:
            client = rt.endpoint_client("dynamo", component, endpoint, response_type=response_type)
            ids = await client.wait_for_instance_ids(5)
            return {i: await client.direct(i, argument) for i in ids}
        finally:
            await rt.shutdown()

    return asyncio.run(go())


def router_state(serve: ServeProcess, servers: EmbeddedServers) -> dict[str, Any]:
    """The KV router's index: the Frontend's own, or the Router service's."""
    if serve.form == "folded":  # type: ignore[attr-defined]
        [state] = call(servers, "Frontend", "router_state", argument=MODEL).values()
    else:
        [state] = call(servers, "Router", "state").values()
    return state  # type: ignore[no-any-return]


def instance_of(serve: ServeProcess, label: str) -> int:
    found = re.findall(rf"\[{re.escape(label)}\] .*ready: instance ([0-9a-f]+)", serve.output())
    return int(found[-1], 16)


def test_shared_prefix_lands_on_the_worker_holding_it_and_a_dead_worker_leaves(
    routed: ServeProcess, servers: EmbeddedServers
) -> None:
    first = complete(routed.base, PREFIX + " first question")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    before = call(servers, "Worker", "stats", EngineStats)
    for i in range(4):
        later = complete(routed.base, PREFIX + f" follow-up number {i}")
        # every later request finds the shared prefix in the cache of the worker it lands on
        assert later["usage"]["prompt_tokens_details"]["cached_tokens"] >= 400
    after = call(servers, "Worker", "stats", EngineStats)
    grew = [w for w in after if after[w].prompt_tokens_total > before[w].prompt_tokens_total]
    assert len(grew) == 1, "requests sharing a prefix were spread over several workers"
    holder = grew[0]
    assert router_state(routed, servers)["workers"][f"{holder:x}"] >= 25

    # SIGKILL the holder: it stops receiving requests and its blocks leave the index
    label = next(f"Worker:{i}" for i in range(3) if instance_of(routed, f"Worker:{i}") == holder)
    os.kill(routed.worker_pids(label)[-1], signal.SIGKILL)
    deadline = time.monotonic() + 3 + 5
    while True:
        state = router_state(routed, servers)
        if f"{holder:x}" not in state["workers"]:
            break
        assert time.monotonic() < deadline, f"dead worker still indexed: {state}"
        time.sleep(0.3)
    for i in range(3):
        result = complete(routed.base, PREFIX + f" after the crash {i}")
        assert result["choices"][0]["finish_reason"] == "length"
    live = call(servers, "Worker", "stats", EngineStats)
    assert holder not in live
