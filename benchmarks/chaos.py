"""Chaos: random workers SIGKILLed under steady load; with migration on, streams complete.

The mocker graph (`graphs.agg:Frontend -f configs/agg_mocker.yaml`) with ``--workers`` (3)
Worker processes behind the Frontend, served by `dynamo serve` on its embedded servers (its
supervisor restarts each killed worker). A closed loop of ``--concurrency`` (48) streamed
completions (`soak.random_request`: 64-512 words in, 32-256 tokens out, ``ignore_eos``) runs
while every ``--interval`` (2) seconds one worker, chosen at random among those up for at
least ``--min-up`` seconds, is killed with SIGKILL, ``--kills`` (100) times, only while at
least two are up (the issue's "2+ workers": one must be there to take the streams over). A
stream counts as completed when it ends with ``[DONE]`` and all its ``max_tokens`` tokens,
with no error frame.

Target (the reliability issue's): >= 99.9% of streams complete across the kills. Also
printed: the streams that were running on a killed worker (the Frontend's migration log
lines), and the longest gap between completions (the worst pause a client saw).

Usage::

    python benchmarks/chaos.py [--kills 100] [--workers 3] [--concurrency 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
import psutil
from harness.client import stream_request
from harness.launch import run_args, serve_graph, stop_graph
from harness.report import check, format_targets, summary
from soak import MODEL, random_request

from dynamo_sdk.serve.embedded import free_port
from tests.serving import answers_a_completion


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0
    short: int = 0  # ended without all their tokens
    errors: dict[str, int] = field(default_factory=dict)
    finished_at: list[float] = field(default_factory=list)
    # (sent, ended, "" or why it failed) of every stream, time.monotonic(): which streams
    # were in flight at a disruption (benchmarks/chaos_suite.py)
    spans: list[tuple[float, float, str]] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why[:120]] = self.errors.get(why[:120], 0) + 1


async def one_stream(
    session: Any,
    url: str,
    rng: random.Random,
    tally: Tally,
    make_body: Callable[[random.Random], dict[str, Any]] = random_request,
) -> None:
    body = make_body(rng)
    sent = time.monotonic()
    result = await stream_request(session, url, body)
    why = ""
    if not result.ok:
        why = result.error or "failed"
        tally.fail(why)
    elif result.tokens != body["max_tokens"]:
        tally.short += 1
        why = f"{result.tokens} of {body['max_tokens']} tokens"
        tally.fail(why)
    else:
        tally.completed += 1
        tally.finished_at.append(time.monotonic())
    tally.spans.append((sent, time.monotonic(), why))


def load_session() -> Any:
    """The closed loop's aiohttp session: no connection limit, 120 s a stream at most."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    )


async def stream_loop(
    session: Any,
    url: str,
    seed: int,
    i: int,
    tally: Tally,
    stop: asyncio.Event,
    make_body: Callable[[random.Random], dict[str, Any]] = random_request,
) -> None:
    """Stream `i` of the closed loop: one stream after another until `stop` is set."""
    rng = random.Random(seed * 7919 + i)
    while not stop.is_set():
        await one_stream(session, url, rng, tally, make_body)


def up_workers(
    serve: Any, workers: int, min_up: float, service: str = "Worker"
) -> list[tuple[str, int]]:
    """(label, pid) of the `service` workers whose newest process has been up ``min_up`` s."""
    out = []
    now = time.time()
    for i in range(workers):
        label = f"{service}:{i}"
        pids = serve.worker_pids(label)
        if not pids:
            continue
        try:
            proc = psutil.Process(pids[-1])
            if proc.is_running() and now - proc.create_time() >= min_up:
                out.append((label, pids[-1]))
        except psutil.NoSuchProcess:
            continue
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    overrides = [
        f"--Worker.ServiceArgs.workers={args.workers}",
        f"--Worker.speedup={args.speedup}",
        "--Frontend.ServiceArgs.workers=1",
        "--Frontend.router_mode=round_robin",
    ]
    serve = serve_graph("graphs.agg:Frontend", "configs/agg_mocker.yaml", overrides, port=port,
                        log_path=Path(args.log_dir) / "chaos_serve.log",
                        env={"DYN_LEASE_TTL": "5"})  # fmt: skip
    tally = Tally()
    kills: list[dict[str, Any]] = []
    rng = random.Random(args.seed)
    try:

        def ready() -> bool:
            return serve.output().count("ready: instance") >= args.workers + 1 and (
                answers_a_completion(f"{serve.base}/v1", MODEL)
            )

        serve.wait_for(ready, 180, "the graph")
        url = f"{serve.base}/v1/completions"
        stop = asyncio.Event()
        async with load_session() as session:

            async def killer() -> None:
                while len(kills) < args.kills:
                    await asyncio.sleep(args.interval)
                    up = up_workers(serve, args.workers, args.min_up)
                    if len(up) < 2:
                        continue  # another worker must be up to take the streams over
                    label, pid = rng.choice(up)
                    os.kill(pid, signal.SIGKILL)
                    kills.append({"t": time.monotonic(), "worker": label, "pid": pid})
                    if len(kills) % 10 == 0:
                        print(f"  {len(kills)} kills: {tally.completed} completed, "
                              f"{tally.failed} failed", flush=True)  # fmt: skip
                await asyncio.sleep(args.interval)  # the last kill's streams finish
                stop.set()

            started = time.monotonic()
            await asyncio.gather(killer(), *(stream_loop(session, url, args.seed, i, tally, stop)
                                             for i in range(args.concurrency)))  # fmt: skip
            run_s = time.monotonic() - started
    finally:
        log = serve.output()
        stop_graph(serve)
    done = sorted(tally.finished_at)
    gap = max((b - a for a, b in itertools.pairwise(done)), default=float("nan"))
    return {"settings": vars(args), "run_s": run_s, "kills": len(kills),
            "tally": {k: v for k, v in asdict(tally).items() if k not in ("finished_at", "spans")},
            "migrations": log.count("continuing on another worker"),
            "restarts": len(re.findall(r"exited with code -?\d+; restart #", log)),
            "exhausted": log.count("worker failed after"), "longest_gap_s": gap}  # fmt: skip


def report(result: dict[str, Any]) -> list[str]:
    t = result["tally"]
    total = t["completed"] + t["failed"]
    share = t["completed"] / total if total else float("nan")
    lines = [
        f"chaos: {result['kills']} SIGKILLs of random workers ({result['settings']['workers']} "
        f"workers, one every {result['settings']['interval']:g} s) under "
        f"{result['settings']['concurrency']} concurrent streams, {result['run_s']:.0f} s",
        f"streams: {t['completed']:,} completed, {t['failed']:,} failed ({share:.3%} complete); "
        f"{result['migrations']} migrations, {result['exhausted']} ran out of migrations; "
        f"longest gap between completions {result['longest_gap_s']:.2f} s",
    ]
    for why, n in sorted(t["errors"].items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  {n} x {why}")
    targets = [
        check(
            ">= 99.9% of streams complete across the kills",
            share * 100,
            "%",
            lambda v: v >= 99.9,
            digits=3,
        ),
        check(
            "every planned kill made",
            float(result["kills"]),
            "kills",
            lambda v: v >= result["settings"]["kills"],
        ),
    ]
    result["targets"] = [asdict(x) for x in targets]
    return [*lines, "", *format_targets(targets), summary(targets)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between kills")
    p.add_argument("--min-up", type=float, default=3.0, help="a worker's age before a kill")
    run_args(p, speedup=20.0, log_dir="/tmp/dynamo-chaos")
    args = p.parse_args()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    print("\n".join(report(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    sys.exit(0)


if __name__ == "__main__":
    main()
