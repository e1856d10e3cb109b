"""The benchmarks' load generator: a cell split over client processes adds up to the cell."""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.serving import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from harness.client import DEFAULT_CLIENT, chat_body, wait_until_answers
from harness.launch import serve_graph, stop_graph
from harness.spread import Cell, ChatLoad, auto_processes, split

MODEL = "dynamo-mocker"


def test_split_keeps_the_cell() -> None:
    cell = Cell(concurrency=10, requests=100, duration=3.0, min_requests=40, rate=50.0, offset=7)
    shares = split(cell, 4)
    assert [s.concurrency for s in shares] == [3, 3, 2, 2]
    assert sum(s.concurrency for s in shares) == 10
    assert sum(s.rate or 0 for s in shares) == pytest.approx(50.0)
    assert sum(s.min_requests for s in shares) >= 40
    assert sum(s.requests for s in shares) >= 100
    assert all(s.duration == 3.0 for s in shares)
    offsets = [s.offset for s in shares]
    assert offsets[0] == 7 and all(b - a >= 10**6 for a, b in itertools.pairwise(offsets))
    # never more shares than tasks; no rate stays no rate
    assert len(split(Cell(2, 10, None, 10), 4)) == 2
    assert all(s.rate is None for s in split(Cell(2, 10, None, 10), 4))


def test_auto_processes() -> None:
    assert auto_processes(2) == 1 and auto_processes(4) == 1
    assert auto_processes(8) == 2 and auto_processes(16) == 4 and auto_processes(128) == 4


@pytest.fixture(scope="module")
def mocker_graph(
    servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("bench_harness") / "serve.log"
    serve = serve_graph(
        "graphs.agg:Frontend", "configs/agg_mocker.yaml", port=free_port(), log_path=log,
        env=servers.env(),
    )  # fmt: skip
    try:
        url = f"{serve.base}/v1/chat/completions"
        body = chat_body(MODEL, [{"role": "user", "content": "ping"}], 4)
        asyncio.run(wait_until_answers(url, body, timeout=120, alive=serve.check))
        yield url
    finally:
        stop_graph(serve)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_cell_over_client_processes(mocker_graph: str, processes: int) -> None:
    """Every request of the cell is sent, answered with exactly `osl` tokens, and counted once."""

    async def run() -> tuple[list[bool], int, float, float]:
        load = ChatLoad(
            mocker_graph, MODEL, 8, str, kind=DEFAULT_CLIENT, fresh=processes == 2, timeout=60,
            max_concurrency=4, processes=processes,
        )  # fmt: skip
        starts = []
        async with load:
            result = await load.run(Cell(4, 24, None, 24), on_start=lambda: starts.append(1))
        exact = [r.ok and r.tokens == 8 for r in result.results]
        return exact, len(starts), result.wall, result.client_cpu_pct

    exact, starts, wall, client_pct = asyncio.run(run())
    assert len(exact) == 24 and all(exact)
    assert starts == 1  # the server-CPU meter starts once, with the measured loop
    assert wall > 0 and math.isfinite(client_pct) and client_pct > 0


def test_a_dead_server_is_an_error_per_request(tmp_path: Path) -> None:
    """No server: the cell ends with failed requests (not a hang), also from client processes."""

    async def run() -> list[str]:
        url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
        load = ChatLoad(url, MODEL, 4, str, kind=DEFAULT_CLIENT, fresh=True, timeout=30,
                        max_concurrency=2, processes=2)  # fmt: skip
        async with load:
            result = await load.run(Cell(2, 4, None, 4))
        return [r.error for r in result.results]

    errors = asyncio.run(run())
    assert len(errors) == 4 and all(errors)
