"""Runtime overhead: what one call through the distributed runtime costs, with no model behind it.

What is measured
----------------
* ``one-hop``: caller -> ``Echo.generate``. The callee is a streaming handler that yields the
  request (a small msgspec Struct) back once.
* ``3-hop``: caller -> ``Hop1.generate`` -> ``Hop2.generate`` -> ``Echo.generate``. Each hop is
  a streaming handler that calls the next hop's client and re-yields its items.
* ``stream``: caller -> ``Echo.stream``, a handler yielding N small ints as fast as it can.

How
---
* A real ``nats-server`` and ``etcd`` (the embedded default, on free loopback ports) unless both
  ``NATS_SERVER`` and ``ETCD_ENDPOINTS`` are set, in which case those are used.
* Echo, Hop1 and Hop2 each run in their own process (this script re-run with the hidden
  ``--role`` argument), on uvloop, each with its own ``DistributedRuntime``; the caller is this
  process, also on uvloop. The caller waits until discovery shows every endpoint, then warms up.
* Request/response cells are closed loops: C tasks each issue requests back to back. Each cell
  runs ``--warmup`` seconds unmeasured, then ``--duration`` seconds measured. Latency is
  ``time.perf_counter`` from the call to the end of its stream; req/s is the number of requests
  started in the measured window over the time until the last of them finished.
* The stream is one call of ``--items`` items: items/s over the time from the call to the last
  item, plus the time to the first item.

Every wait is bounded; children and servers are stopped on exit, Ctrl-C and errors.
``--profile DIR`` writes a cProfile dump per process (``caller.prof``, ``echo.prof``, ...).

Usage::

    python benchmarks/runtime_overhead.py [--duration 4] [--concurrency 1,16,64]
        [--items 100000] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
import msgspec
import uvloop
from _common import interrupt_on_sigterm, json_safe, percentile, positive_ints, profiled, run_all
from harness.report import Target, check, fmt, format_targets, table

from dynamo_sdk.runtime import DistributedRuntime, EndpointClient, RuntimeSettings
from dynamo_sdk.serve.embedded import EmbeddedServers, configured_servers, start_embedded
from dynamo_sdk.serve.procutil import die_with_parent

ROLES = ("echo", "hop2", "hop1")  # started in this order: each hop waits for the next one
NEXT_HOP = {"hop1": "Hop2", "hop2": "Echo"}
COMPONENT = {"echo": "Echo", "hop1": "Hop1", "hop2": "Hop2"}

# one-hop p50 < 1 ms at c=1; >= 10,000 req/s at c=64; >= 100,000 streamed items/s
TARGET_P50_MS = 1.0
TARGET_P50_CONC = 1
TARGET_RPS = 10_000.0
TARGET_RPS_CONC = 64
TARGET_ITEMS_PER_S = 100_000.0

DISCOVERY_TIMEOUT = 30.0  # seconds for a child to come up and for the caller to see it
SHUTDOWN_TIMEOUT = 5.0  # seconds for a runtime or a child process to stop


class Ping(msgspec.Struct):
    """The small request (and echoed response) of the request/response cells."""

    seq: int
    text: str = "ping"


# ---- callees (child processes) -----------------------------------------------------------


def _settings() -> RuntimeSettings:
    return RuntimeSettings.from_env()


async def _serve_role(role: str, namespace: str) -> None:
    """Serve the endpoints of `role` until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runtime = await asyncio.wait_for(DistributedRuntime.connect(_settings()), DISCOVERY_TIMEOUT)
    try:
        if role == "echo":

            async def echo(req: Ping) -> AsyncIterator[Ping]:
                yield req

            async def count(n: int) -> AsyncIterator[int]:
                for i in range(n):
                    yield i

            await runtime.serve_endpoint(namespace, "Echo", "generate", echo, request_type=Ping)
            await runtime.serve_endpoint(namespace, "Echo", "stream", count, request_type=int)
        else:
            nxt = runtime.endpoint_client(namespace, NEXT_HOP[role], "generate", Ping)
            await nxt.wait_for_instance_ids(DISCOVERY_TIMEOUT)

            async def hop(req: Ping) -> AsyncIterator[Ping]:
                async for item in nxt(req):
                    yield item

            await runtime.serve_endpoint(
                namespace, COMPONENT[role], "generate", hop, request_type=Ping
            )
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runtime.shutdown(), SHUTDOWN_TIMEOUT)


def run_role(role: str, namespace: str, profile_dir: Path | None) -> None:
    with profiled(profile_dir, role):
        uvloop.run(_serve_role(role, namespace))


# ---- children and servers ------------------------------------------------------------------


class Children:
    """The callee processes: started with this script's `--role`, stopped on exit."""

    def __init__(self, env: dict[str, str], namespace: str, profile_dir: Path | None) -> None:
        self.env = {**os.environ, **env}
        self.namespace = namespace
        self.profile_dir = profile_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role]
        cmd += ["--namespace", self.namespace]
        if self.profile_dir is not None:
            cmd += ["--profile", str(self.profile_dir)]
        # A session of its own: Ctrl-C reaches this process only, which stops the children in
        # order; die_with_parent covers this process being killed outright.
        self.procs[role] = subprocess.Popen(
            cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def check(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"callee {role!r} exited early with code {proc.returncode}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(SHUTDOWN_TIMEOUT)


# ---- measurement ---------------------------------------------------------------------------


@dataclass
class Cell:
    case: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float


@dataclass
class StreamResult:
    items: int
    seconds: float
    items_per_s: float
    first_item_ms: float


@dataclass
class Results:
    cells: list[Cell] = field(default_factory=list)
    stream: StreamResult | None = None
    targets: list[Target] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


async def _call(client: EndpointClient, req: Ping) -> None:
    async for _ in client(req):
        pass


async def closed_loop(
    case: str, client: EndpointClient, concurrency: int, warmup: float, duration: float
) -> Cell:
    """C tasks issuing requests back to back; only requests started after warm-up count."""
    clock = time.perf_counter
    start = clock() + warmup
    end = start + duration
    latencies: list[float] = []
    errors = 0
    last_done = start

    async def worker(wid: int) -> None:
        nonlocal errors, last_done
        seq = wid << 32
        while True:
            t0 = clock()
            if t0 >= end:
                return
            seq += 1
            try:
                await _call(client, Ping(seq))
            except Exception:
                errors += t0 >= start
                continue
            t1 = clock()
            if t0 >= start:
                latencies.append(t1 - t0)
                last_done = max(last_done, t1)

    await run_all([worker(i) for i in range(concurrency)], warmup + duration + 30.0)
    latencies.sort()
    elapsed = max(last_done - start, 1e-9)
    return Cell(
        case=case,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 3),
        req_per_s=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        mean_ms=(sum(latencies) / len(latencies) * 1e3) if latencies else math.nan,
    )


async def stream_items(client: EndpointClient, items: int) -> StreamResult:
    clock = time.perf_counter
    t0 = clock()
    first = math.nan
    got = 0
    async for _ in client(items):
        if got == 0:
            first = clock() - t0
        got += 1
    elapsed = clock() - t0
    if got != items:
        raise RuntimeError(f"stream returned {got} items, expected {items}")
    return StreamResult(
        items=got, seconds=elapsed, items_per_s=got / elapsed, first_item_ms=first * 1e3
    )


def evaluate_targets(results: Results) -> list[Target]:
    by_key = {(c.case, c.concurrency): c for c in results.cells}
    latency_cell = by_key.get(("one-hop", TARGET_P50_CONC))
    rps_cell = by_key.get(("one-hop", TARGET_RPS_CONC))
    stream = results.stream
    return [
        check(
            f"one-hop p50 < {TARGET_P50_MS:g} ms at c={TARGET_P50_CONC}",
            latency_cell.p50_ms if latency_cell else None,
            "ms",
            lambda v: v < TARGET_P50_MS,
        ),
        check(
            f"one-hop >= {TARGET_RPS:,.0f} req/s at c={TARGET_RPS_CONC}",
            rps_cell.req_per_s if rps_cell else None,
            "req/s",
            lambda v: v >= TARGET_RPS,
        ),
        check(
            f"stream >= {TARGET_ITEMS_PER_S:,.0f} items/s",
            stream.items_per_s if stream else None,
            "items/s",
            lambda v: v >= TARGET_ITEMS_PER_S,
        ),
    ]


async def measure(args: argparse.Namespace, namespace: str, children: Children) -> Results:
    results = Results()
    runtime = await asyncio.wait_for(DistributedRuntime.connect(_settings()), DISCOVERY_TIMEOUT)
    try:
        echo = runtime.endpoint_client(namespace, "Echo", "generate", Ping)
        hop1 = runtime.endpoint_client(namespace, "Hop1", "generate", Ping)
        stream = runtime.endpoint_client(namespace, "Echo", "stream", int)
        for client in (echo, hop1, stream):
            deadline = time.monotonic() + DISCOVERY_TIMEOUT
            while not client.instance_ids():
                children.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{client.target} did not appear in discovery")
                with contextlib.suppress(Exception):
                    await client.wait_for_instance_ids(0.5)

        # Warm-up: connections, subscriptions, code paths and caches on every process.
        for client in (echo, hop1):
            await run_all([_call(client, Ping(i)) for i in range(200)], 30.0)
        await asyncio.wait_for(stream_items(stream, min(args.items, 10_000)), 30)

        for case, client in (("one-hop", echo), ("3-hop", hop1)):
            for conc in args.concurrency:
                children.check()
                cell = await closed_loop(case, client, conc, args.warmup, args.duration)
                results.cells.append(cell)
                print(f"  ... {case} c={conc}: {cell.req_per_s:,.0f} req/s", file=sys.stderr)
        children.check()
        timeout = 60.0 + args.items / 10_000
        results.stream = await asyncio.wait_for(stream_items(stream, args.items), timeout)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runtime.shutdown(), SHUTDOWN_TIMEOUT)
    results.targets = evaluate_targets(results)
    return results


async def _measure_main(args: argparse.Namespace, namespace: str, children: Children) -> Results:
    # SIGTERM cancels the measurement, so that the caller's cleanup runs as it does on Ctrl-C.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure(args, namespace, children)


# ---- report ----------------------------------------------------------------------------------


def format_report(results: Results) -> str:
    header = ("case", "conc", "req/s", "p50 ms", "p99 ms", "requests", "errors")
    rows = [
        (
            c.case,
            str(c.concurrency),
            fmt(c.req_per_s, 0),
            fmt(c.p50_ms, 3),
            fmt(c.p99_ms, 3),
            str(c.requests),
            str(c.errors),
        )
        for c in results.cells
    ]
    out = [*table(header, rows), ""]
    if results.stream is not None:
        s = results.stream
        out.append(
            f"stream: {s.items:,} items in {s.seconds:.3f} s = {s.items_per_s:,.0f} items/s "
            f"(first item after {s.first_item_ms:.3f} ms)"
        )
        out.append("")
    out += format_targets(results.targets)
    return "\n".join(out)


# ---- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per cell")
    parser.add_argument(
        "--concurrency", type=positive_ints, default=[1, 16, 64], help="e.g. 1,16,64"
    )
    parser.add_argument("--items", type=int, default=100_000, help="items in the stream case")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a cProfile dump per process here"
    )
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None and not args.namespace:
        parser.error("--role needs --namespace")
    if args.duration <= 0 or args.warmup < 0 or args.items < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --items >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role is not None:
        run_role(args.role, args.namespace, args.profile)
        return 0

    # SIGTERM before or after the event loop runs (inside it, it cancels the measurement).
    interrupt_on_sigterm()

    namespace = f"bench{os.getpid()}_{uuid.uuid4().hex[:6]}"
    servers: EmbeddedServers | None = None
    children: Children | None = None
    try:
        env = configured_servers()
        if env is None:
            servers = start_embedded()
            env = servers.env()
        os.environ.update(env)
        children = Children(env, namespace, args.profile)
        for role in ROLES:
            children.start(role)
        with profiled(args.profile, "caller"):
            results = uvloop.run(_measure_main(args, namespace, children))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: stopping the callees and servers", file=sys.stderr)
        return 130
    finally:
        # Cleanup is bounded (SHUTDOWN_TIMEOUT per stage); a second signal must not cut it short.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if children is not None:
            children.stop()
        if servers is not None:
            servers.stop()

    results.settings = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "items": args.items,
        "servers": "embedded" if servers is not None else "external",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "nats": env["NATS_SERVER"],
    }
    print(format_report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(json_safe(asdict(results)), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
