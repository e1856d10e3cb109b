"""Soak: many concurrent streams for a long time, disconnects mixed in; nothing may leak.

The mocker graph (`graphs.agg:Frontend -f configs/agg_mocker.yaml`, one Frontend process,
one Worker) served by `dynamo serve` on its embedded servers, and a closed loop of
``--concurrency`` (512) streamed completions for ``--duration`` (600) seconds: each task sends
a prompt of 64-512 words asking for 32-256 tokens, and ``--disconnect`` (10%) of the
requests are abandoned by the client after their first token (the connection closed, as a
browser tab would). Every ``--sample`` seconds the benchmark reads each served process's RSS
(psutil) and, from their Prometheus endpoints, the Frontend's in-flight requests and the
Worker's running and waiting requests and KV usage.

Targets (the reliability issue's): 0 failed requests (a disconnect the client chose is not a
failure); each process's RSS flat after warm-up (the first ``--warmup`` share of the run):
the least-squares slope, printed in MB/min, must add under 5% of the process's RSS over the
rest of the run; and once the load stops, no request is left in flight on the Frontend and
none running or waiting on the Worker, and the Worker's KV usage is back to 0 (no leaked
blocks).

Usage::

    python benchmarks/soak.py [--duration 600] [--concurrency 512] [--disconnect 0.1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
import psutil
from harness.client import completion_body
from harness.launch import run_args, serve_graph, stop_graph
from harness.report import check, format_targets, summary, table

from dynamo_sdk.serve.embedded import free_port
from tests.serving import answers_a_completion

MODEL = "dynamo-mocker"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: dict[str, float]  # "Frontend:0" -> MB
    frontend_inflight: float = float("nan")
    worker_running: float = float("nan")
    worker_waiting: float = float("nan")
    kv_usage: float = float("nan")


@dataclass
class Counts:
    done: int = 0
    disconnected: int = 0
    failed: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed += 1
        key = why[:120]
        self.errors[key] = self.errors.get(key, 0) + 1


def _metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples in ``text`` (NaN if absent)."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else float("nan")


async def _get(session: Any, url: str) -> str:
    try:
        async with session.get(url, timeout=5) as response:
            return str(await response.text())
    except Exception:
        return ""


def _processes(serve: Any) -> dict[str, psutil.Process]:
    """The served worker processes by label (``Frontend:0``), from the supervisor's log."""
    out: dict[str, psutil.Process] = {}
    for label in re.findall(r"started (\w+:\d+) \(pid", serve.output()):
        pid = serve.worker_pids(label)[-1]
        try:
            out[label] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass
    return out


async def sample(session: Any, serve: Any, t: float) -> Sample:
    rss = {}
    for label, proc in _processes(serve).items():
        try:
            rss[label] = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    frontend = await _get(session, f"{serve.base}/metrics")
    worker = await _get(session, f"http://127.0.0.1:{serve.health_port('Worker:0')}/metrics")
    return Sample(
        t,
        rss,
        _metric(frontend, "dynamo_frontend_inflight_requests"),
        _metric(worker, "dynamo_worker_running_requests"),
        _metric(worker, "dynamo_worker_waiting_requests"),
        _metric(worker, "dynamo_worker_kv_cache_usage_ratio"),
    )


def random_request(rng: random.Random) -> dict[str, Any]:
    """A streamed completion of 64-512 words asking for 32-256 tokens (soak and chaos)."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(64, 512)))
    return completion_body(MODEL, prompt, rng.randint(32, 256))


async def one_request(
    session: Any, url: str, rng: random.Random, args: Any, counts: Counts
) -> None:
    body = random_request(rng)
    leave = rng.random() < args.disconnect
    try:
        async with session.post(url, json=body, timeout=args.request_timeout) as response:
            if response.status != 200:
                counts.fail(f"HTTP {response.status}: {(await response.text())[:80]}")
                return
            done = False
            async for line in response.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                if b'"error"' in line:
                    counts.fail(line.decode(errors="replace")[:120])
                    return
                if leave and b'"text"' in line:
                    counts.disconnected += 1
                    response.close()  # the client goes away mid-stream
                    return
                if b'"usage"' in line and b'"completion_tokens"' in line:
                    usage = json.loads(line.removeprefix(b"data: "))["usage"]
                    counts.tokens += int(usage["completion_tokens"])
            if done:
                counts.done += 1
            else:
                counts.fail("stream ended without [DONE]")
    except Exception as exc:
        counts.fail(f"{type(exc).__name__}: {exc}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    port = free_port()
    log_dir = Path(args.log_dir)
    overrides = [
        "--Frontend.ServiceArgs.workers=1",
        f"--Frontend.max_connections={args.concurrency * 2}",
        f"--Worker.speedup={args.speedup}",
        f"--Worker.max_num_seqs={args.concurrency}",
        f"--Worker.num_blocks={args.num_blocks}",
        "--Worker.stats_interval=1",  # the gauges read after the load are at most 1 s old
    ]
    serve = serve_graph("graphs.agg:Frontend", "configs/agg_mocker.yaml", overrides, port=port,
                        log_path=log_dir / "soak_serve.log")  # fmt: skip
    counts = Counts()
    samples: list[Sample] = []
    try:
        serve.wait_for(lambda: answers_a_completion(f"{serve.base}/v1", MODEL), 120, "the graph")
        url = f"{serve.base}/v1/completions"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            started = time.monotonic()
            stop_at = started + args.duration

            async def task(i: int) -> None:
                rng = random.Random(args.seed * 100_003 + i)
                while time.monotonic() < stop_at:
                    await one_request(session, url, rng, args, counts)

            async def sampler() -> None:
                while time.monotonic() < stop_at:
                    samples.append(await sample(session, serve, time.monotonic() - started))
                    print(f"  {samples[-1].t:6.0f} s: {counts.done} done, {counts.disconnected} "
                          f"disconnected, {counts.failed} failed; RSS "
                          + ", ".join(f"{k} {v:.0f} MB" for k, v in samples[-1].rss_mb.items()),
                          flush=True)  # fmt: skip
                    await asyncio.sleep(args.sample)

            await asyncio.gather(sampler(), *(task(i) for i in range(args.concurrency)))
            load_s = time.monotonic() - started
            # every client request has ended; give the servers ``--settle`` seconds to finish
            # what they were told to abort (their gauges refresh every second here)
            settle_by = time.monotonic() + args.settle
            while True:
                final = await sample(session, serve, time.monotonic() - started)
                idle = final.frontend_inflight + final.worker_running + final.worker_waiting
                if (idle == 0 and final.kv_usage == 0) or time.monotonic() > settle_by:
                    break
                await asyncio.sleep(0.5)
            settled_s = time.monotonic() - started - load_s
    finally:
        stop_graph(serve)
    return {"settings": vars(args), "counts": asdict(counts), "load_s": load_s,
            "settled_s": settled_s, "samples": [asdict(s) for s in samples],
            "final": asdict(final)}  # fmt: skip


def rss_slopes(samples: list[dict[str, Any]], warmup: float, duration: float) -> dict[str, Any]:
    """Per process: the least-squares RSS slope after warm-up (MB/min), and what it adds over
    the rest of the run as a share of the RSS at the end of warm-up."""
    out = {}
    labels = {k for s in samples for k in s["rss_mb"]}
    for label in sorted(labels):
        points = [(s["t"], s["rss_mb"][label]) for s in samples
                  if s["t"] >= warmup * duration and label in s["rss_mb"]]  # fmt: skip
        if len(points) < 3:
            continue
        ts, ms = zip(*points, strict=True)
        slope = statistics.linear_regression(ts, ms).slope  # MB/s
        growth = slope * (ts[-1] - ts[0]) / ms[0]
        out[label] = {"slope_mb_per_min": slope * 60, "start_mb": ms[0], "end_mb": ms[-1],
                      "growth_share": growth}  # fmt: skip
    return out


def report(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    counts, final = result["counts"], result["final"]
    lines = [
        f"soak: {args.concurrency} concurrent streams for {result['load_s']:.0f} s on the "
        f"mocker (speedup {args.speedup}), {args.disconnect:.0%} abandoned after their first "
        "token",
        f"requests: {counts['done']:,} completed, {counts['disconnected']:,} disconnected by "
        f"the client, {counts['failed']:,} failed; {counts['tokens']:,} tokens "
        f"({counts['tokens'] / result['load_s']:,.0f}/s)",
    ]
    for why, n in sorted(counts["errors"].items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  {n} x {why}")
    slopes = rss_slopes(result["samples"], args.warmup, result["load_s"])
    rows = [[label, f"{v['start_mb']:.0f}", f"{v['end_mb']:.0f}", f"{v['slope_mb_per_min']:+.2f}",
             f"{v['growth_share']:+.1%}"] for label, v in slopes.items()]  # fmt: skip
    lines += ["", *table(["process", "RSS after warm-up MB", "at the end", "slope MB/min",
                          "growth"], rows)]  # fmt: skip
    lines.append(
        f"{result['settled_s']:.1f} s after the load: Frontend in flight "
        f"{final['frontend_inflight']:g}, Worker running "
        f"{final['worker_running']:g}, waiting {final['worker_waiting']:g}, KV usage "
        f"{final['kv_usage']:.1%}"
    )
    worst = max((v["growth_share"] for v in slopes.values()), default=float("nan"))
    targets = [
        check("no failed request", float(counts["failed"]), "failed", lambda v: v == 0),
        check("RSS flat after warm-up (largest growth)", worst * 100, "%", lambda v: v < 5.0),
        check(
            "nothing in flight after the load",
            final["frontend_inflight"] + final["worker_running"] + final["worker_waiting"],
            "requests",
            lambda v: v == 0,
        ),
        check("no KV block leaked", final["kv_usage"] * 100, "%", lambda v: v == 0.0),
    ]
    lines += ["", *format_targets(targets), summary(targets)]
    result["rss"] = slopes
    result["targets"] = [asdict(t) for t in targets]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=512)
    p.add_argument("--disconnect", type=float, default=0.1, help="share abandoned mid-stream")
    p.add_argument("--num-blocks", type=int, default=65536, help="the Worker's KV blocks")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2, help="share of the run before RSS counts")
    p.add_argument("--settle", type=float, default=15.0, help="seconds the servers get to idle")
    p.add_argument("--request-timeout", type=float, default=120.0)
    run_args(p, speedup=50.0, log_dir="/tmp/dynamo-soak")
    args = p.parse_args()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    lines = report(result, args)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    sys.exit(0)


if __name__ == "__main__":
    main()
