"""A closed loop of streamed chat requests, in this process or spread over client processes.

One Python client process saturates near 2,000 streamed requests/s (it parses every SSE chunk),
which a many-core host's servers can exceed: then the table measures the load generator, and a
server that streams more, smaller chunks looks slower than one that sends the whole answer in
one write. `ChatLoad(processes=N)` runs each cell's tasks in N processes (spawned once, kept for
every cell): the cell's concurrency, request counts and pacing rate are split between them, all
start their measured loops at the same moment, and their results are pooled into one cell.
``processes=1`` runs in this process, connections kept across cells, exactly as a plain
`closed_loop` over a `ClientPool`.

Every cell also reports the busiest client process's CPU use (percent of one core over the
cell): near 100 % the figures are the client's limit, not the server's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from harness.client import (
    ClientPool,
    RequestResult,
    chat_body,
    closed_loop,
    stream_request,
)

START_LEAD_S = 1.0  # client processes warm up, then start together this long after dispatch
WARM_TASKS = 32  # unmeasured requests first: connections, code paths, caches


def auto_processes(cpus: int | None = None) -> int:
    """Client processes for this host: 1 up to 4 cores (the servers need them), else a
    quarter of the cores, at most 4."""
    cpus = cpus or os.cpu_count() or 1
    return 1 if cpus <= 4 else min(4, cpus // 4)


@dataclass(frozen=True)
class Cell:
    """One closed loop: `concurrency` tasks, at most `requests`, for `duration` seconds once
    `min_requests` started (None: exactly `requests`), optionally paced at `rate` req/s."""

    concurrency: int
    requests: int
    duration: float | None
    min_requests: int
    rate: float | None = None
    offset: int = 0  # prompt numbers start here


@dataclass
class CellResult:
    results: list[RequestResult]
    wall: float  # seconds, from the common start to the last answer
    client_cpu_pct: float  # the busiest client process, percent of one core


@dataclass(frozen=True)
class _Target:
    """What every request of a load is: picklable, for the client processes."""

    url: str
    model: str
    osl: int
    prompt: Callable[[int], str]  # a module-level function: request number -> user message
    kind: str
    fresh: bool
    timeout: float


class ChatLoad:
    """``async with ChatLoad(url, ...) as load: await load.run(cell, on_start)``."""

    def __init__(
        self,
        url: str,
        model: str,
        osl: int,
        prompt: Callable[[int], str],
        *,
        kind: str,
        fresh: bool,
        timeout: float,
        max_concurrency: int,
        processes: int = 1,
    ) -> None:
        self.target = _Target(url, model, osl, prompt, kind, fresh, timeout)
        self.max_concurrency = max_concurrency
        self.processes = max(1, min(processes, max_concurrency))
        self._pool: ClientPool | None = None
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    async def __aenter__(self) -> ChatLoad:
        if self.processes == 1:
            t = self.target
            self._pool = await ClientPool(self.max_concurrency, t.kind, fresh=t.fresh).__aenter__()
            warm = min(self.max_concurrency, WARM_TASKS)
            send = _sender(self._pool, t, 10**6)
            await closed_loop(send, 2 * warm, warm, t.timeout)
        else:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn")
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.__aexit__(None, None, None)
            self._pool = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def run(self, cell: Cell, on_start: Callable[[], None] = lambda: None) -> CellResult:
        """One cell; `on_start()` runs as its measured loop starts (a server-CPU meter)."""
        if self._executor is None:
            assert self._pool is not None, "use ChatLoad inside `async with`"
            on_start()
            cpu0 = time.process_time()
            send = _sender(self._pool, self.target, cell.offset)
            results, wall = await _loop(send, cell, self.target.timeout)
            return CellResult(results, wall, 100 * (time.process_time() - cpu0) / wall)
        return await self._run_spread(cell, on_start)

    async def _run_spread(self, cell: Cell, on_start: Callable[[], None]) -> CellResult:
        assert self._executor is not None
        shares = split(cell, self.processes)
        loop = asyncio.get_running_loop()
        start_at = time.time() + START_LEAD_S
        futures = [
            loop.run_in_executor(self._executor, run_share, self.target, share, start_at)
            for share in shares
        ]
        await asyncio.sleep(max(start_at - time.time(), 0.0))
        on_start()
        outcomes = await asyncio.gather(*futures)
        results = [r for outcome in outcomes for r in outcome[0]]
        started = min(o[1] for o in outcomes)
        ended = max(o[2] for o in outcomes)
        busiest = max(o[3] for o in outcomes)
        return CellResult(results, max(ended - started, 1e-9), busiest)


def split(cell: Cell, processes: int) -> list[Cell]:
    """`cell` as up to `processes` shares: tasks spread evenly, counts and rate in proportion,
    prompt numbers in disjoint ranges."""
    n = max(1, min(processes, cell.concurrency))
    shares = []
    for i in range(n):
        tasks = cell.concurrency // n + (i < cell.concurrency % n)
        part = tasks / cell.concurrency
        shares.append(
            replace(
                cell,
                concurrency=tasks,
                requests=max(math.ceil(cell.requests * part), tasks),
                min_requests=math.ceil(cell.min_requests * part),
                rate=cell.rate * part if cell.rate else None,
                offset=cell.offset + i * 10**7,
            )
        )
    return shares


def run_share(target: _Target, cell: Cell, start_at: float) -> tuple[Any, ...]:
    """In a client process: warm up, wait for `start_at` (wall clock), run the share.

    Returns (results, started, ended, CPU percent of this process over the share), the times
    as ``time.time()``.
    """
    try:
        import uvloop

        return uvloop.run(_share(target, cell, start_at))
    except ImportError:
        return asyncio.run(_share(target, cell, start_at))


async def _share(target: _Target, cell: Cell, start_at: float) -> tuple[Any, ...]:
    async with ClientPool(cell.concurrency, target.kind, fresh=target.fresh) as pool:
        warm = _sender(pool, target, cell.offset + 10**6)
        await closed_loop(warm, 2 * cell.concurrency, cell.concurrency, target.timeout)
        await asyncio.sleep(max(start_at - time.time(), 0.0))
        started, cpu0 = time.time(), time.process_time()
        results, wall = await _loop(_sender(pool, target, cell.offset), cell, target.timeout)
        cpu = 100 * (time.process_time() - cpu0) / max(wall, 1e-9)
        return results, started, started + wall, cpu


def _sender(
    pool: ClientPool, target: _Target, offset: int
) -> Callable[[int, int], Awaitable[RequestResult]]:
    def send(i: int, task: int) -> Awaitable[RequestResult]:
        messages = [{"role": "user", "content": target.prompt(offset + i)}]
        return stream_request(pool[task], target.url, chat_body(target.model, messages, target.osl))

    return send


async def _loop(
    send: Callable[[int, int], Awaitable[RequestResult]], cell: Cell, timeout: float
) -> tuple[list[RequestResult], float]:
    return await closed_loop(
        send,
        cell.requests,
        cell.concurrency,
        timeout,
        duration=cell.duration,
        min_requests=cell.min_requests,
        rate=cell.rate,
    )
