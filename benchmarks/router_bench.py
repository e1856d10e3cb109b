"""KV-aware routing vs round robin on simulated workers, and the cost of one routing decision.

Everything runs in ONE process with no NATS or etcd: what is measured is the routing logic
(``KvRouter``, ``KvIndexer``, vLLM-compatible block hashing) and the engines' behaviour
(``MockerEngine``: paged KV cache with prefix caching, continuous batching, a timing model on a
simulated clock), not the transport. KV events go from each engine straight into the router's
indexer (no delay, no loss), and load metrics are copied into the router every
``--metrics-interval`` seconds of wall time, as a worker would publish them.

Part 1: routing quality
-----------------------
Workload (all seeded by ``--seed``): ``--system-prompts`` distinct system prompts of
``--system-tokens`` tokens; ``--sessions`` multi-turn conversations of ``--turns`` turns, each
picking one system prompt at random. Turn k's prompt is the system prompt, then every earlier
turn's user message and assistant answer, then a new user message (``--first-user-tokens`` for
the first turn, ``--user-tokens`` after), so prompts grow from ~1k to ~4k tokens; a user
message is cut short so that no prompt exceeds ``--max-prompt`` tokens. Each turn asks for
``--osl`` output tokens (a random length in the range, no stop tokens). Token ids are random
ints below 32000. The assistant tokens that go into the next prompt are the ones the mocker
generated (deterministic given the prompt), so a follow-up's prefix is exactly what the worker
that served the previous turn cached, and the workload is identical in every mode.

Sessions arrive as a Poisson process of ``--rate`` sessions per *simulated* second; a session
sends its next turn ``--think`` simulated seconds (exponential mean) after the previous answer
completed. Simulated seconds map to wall seconds through the engines' ``--speedup``, so the
offered load relative to engine capacity is the same at any speedup. ``--workers`` fresh
mocker engines (``--num-blocks`` KV blocks of ``--block-size`` tokens each: the cluster cannot
cache every session's history) serve the same workload once per router mode: ``round_robin``,
then ``kv`` (``--overlap-weight`` sets the kv router's ``RouterConfig.overlap_weight``).

Per mode: prefix-cache hit rate (sum of the engines' ``cached_tokens`` over sum of prompt
tokens; also the hit rate on the part of the prompts after the system prompt, i.e. the
conversation history that only routing can reuse; the *reusable* rate, the prefix that any
earlier request computed anywhere, i.e. the hit rate of one worker with an infinite cache, which
no router can beat; and the hit rate the router predicted from its index); TTFT p50/p90/p99 on
the mocker's simulated clock (``simulated_ttft_ms``: unlike wall time it does not depend on host
CPU noise) and wall-clock TTFT (scaled by ``--speedup`` to the same units); output tokens/s over
the run (wall duration x speedup = simulated seconds); busy GPU seconds (the engines' simulated
step time summed: the compute the workload cost); and the host CPU use, which must stay well
below 100% for the simulated figures to be trustworthy (an overloaded host stretches steps and
piles more requests into each one).

Part 2: decision cost
---------------------
A ``KvRouter`` over ``--decision-workers`` workers whose index holds ``--index-blocks`` distinct
blocks: chains of 256 blocks, each held (a random prefix, the first holder all of it) by 1-8
random workers, applied as ``KvEventBatch``es. Most chains are random 64-bit hashes (the index
does not care how they were made); 64 are the real hashes of random 4096-token prompts so that
queries can hit. Timed: ``router.choose(tokens, workers)`` for 4096-token prompts, including
the sha256+cbor block hashing, for three mixes: ``hit`` (a prompt some workers hold: the
deepest index walk), ``partial`` (a held prompt's prefix, then new tokens) and ``miss`` (new
tokens). Load metrics are refreshed every 50 ms outside the timed calls. The split: hashing
(``block_hashes_int``) and ``find_matches`` timed on their own; the rest (cost loop, load
bookkeeping) = choose - hash - find, from the p50s. Also the index's memory (RSS delta) and
fill rate.

Usage::

    python benchmarks/router_bench.py [--sessions 200] [--turns 4] [--workers 8] [--rate 4]
        [--seed 0] [--json out.json] [--png benchmarks/router_bench.png] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
import psutil
import uvloop
from _common import json_safe
from harness.plot import Panel, Series, plot_panels
from harness.report import Target, check, format_targets, table

from dynamo_sdk.llm.engines.base import EngineError
from dynamo_sdk.llm.engines.mocker import MockerEngine
from dynamo_sdk.llm.kv.events import BlockStored, KvEvent, KvEventBatch, LoadMetrics
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig, RouterMode
from dynamo_sdk.llm.protocol import PreprocessedRequest, StopConditions

VOCAB = 32000
MODES: tuple[RouterMode, ...] = ("round_robin", "kv")

# targets: kv TTFT p50 >= 2x lower than round robin, kv prefix hit rate >= 3x round robin,
# one decision (4096-token prompt, 64 workers, 1M-block index) p99 < 1 ms
TARGET_TTFT_RATIO = 2.0
TARGET_HIT_RATIO = 3.0
TARGET_DECISION_P99_MS = 1.0
DECISION_PROMPT_TOKENS = 4096
CHAIN_BLOCKS = 256
CPU_WARN = 0.85  # host CPU share above which simulated figures may be skewed


# ---- workload --------------------------------------------------------------------------------


@dataclass
class Session:
    index: int
    arrival_s: float  # simulated seconds after the start
    system: int  # which system prompt
    user_messages: list[list[int]]  # one per turn
    think_s: list[float]  # simulated seconds after each answer before the next turn
    max_tokens: list[int]  # output length per turn


@dataclass
class Workload:
    system_prompts: list[list[int]]
    sessions: list[Session]


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _uniform(rng: random.Random, span: tuple[int, int]) -> int:
    return rng.randint(span[0], span[1])


def make_workload(args: argparse.Namespace) -> Workload:
    """The seeded sessions; assistant tokens are not here: the engines generate them."""
    rng = random.Random(args.seed)
    systems = [_tokens(rng, _uniform(rng, args.system_tokens)) for _ in range(args.system_prompts)]
    sessions = []
    t = 0.0
    for i in range(args.sessions):
        t += rng.expovariate(args.rate)
        users = [
            _tokens(rng, _uniform(rng, args.first_user_tokens if k == 0 else args.user_tokens))
            for k in range(args.turns)
        ]
        sessions.append(
            Session(
                index=i,
                arrival_s=t,
                system=rng.randrange(len(systems)),
                user_messages=users,
                think_s=[rng.expovariate(1 / args.think) if args.think > 0 else 0.0 for _ in users],
                max_tokens=[_uniform(rng, args.osl) for _ in users],
            )
        )
    return Workload(systems, sessions)


# ---- part 1: one routing mode over the workload ----------------------------------------------


@dataclass
class RequestRecord:
    session: int
    turn: int
    worker: int
    prompt_tokens: int
    system_tokens: int
    cached_tokens: int
    reusable_tokens: int  # prefix computed before by ANY request: one infinite shared cache
    predicted_cached_tokens: int  # the router's overlap estimate, in tokens
    output_tokens: int
    sim_ttft_ms: float
    wall_ttft_ms: float  # wall-clock, multiplied by the speedup (simulated-ms units)


@dataclass
class ModeResult:
    mode: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    hit_rate: float = 0.0
    history_hit_rate: float = 0.0  # beyond the system prompt: what only routing can reuse
    # The hit rate of one worker with an infinite cache serving everything: no router can
    # beat it, so reusable / round-robin's hit rate caps what kv can gain over round-robin.
    reusable_rate: float = 0.0
    predicted_hit_rate: float = 0.0
    ttft_p50_ms: float = math.nan
    ttft_p90_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    wall_ttft_p50_ms: float = math.nan
    wall_ttft_p99_ms: float = math.nan
    output_tokens: int = 0
    sim_duration_s: float = 0.0
    output_tok_per_s: float = 0.0
    busy_gpu_s: float = 0.0
    max_worker_busy_share: float = 0.0  # busiest worker's busy time over the mean
    requests_per_worker: list[int] = field(default_factory=list)
    preemptions: int = 0
    wall_s: float = 0.0
    cpu_share: float = 0.0  # process CPU time over wall time
    by_turn: list[dict[str, float]] = field(default_factory=list)
    sim_ttfts_ms: list[float] = field(default_factory=list)


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _event_sink(router: KvRouter, worker: int) -> Callable[[list[KvEvent]], None]:
    """An engine's KV events as the worker would publish them: one numbered batch per call."""
    seq = itertools.count()

    def sink(events: list[KvEvent]) -> None:
        router.indexer.apply(KvEventBatch(worker, next(seq), events))

    return sink


def _make_engines(args: argparse.Namespace) -> list[MockerEngine]:
    hi_osl = args.osl[1]
    context = args.max_prompt + hi_osl + args.block_size
    return [
        MockerEngine(
            num_blocks=args.num_blocks,
            block_size=args.block_size,
            context_length=context,
            speedup=args.speedup,
            seed=args.seed,
            vocab_size=VOCAB,
        )
        for _ in range(args.workers)
    ]


async def run_mode(mode: RouterMode, workload: Workload, args: argparse.Namespace) -> ModeResult:
    """Serve the whole workload with fresh engines and a fresh router in `mode`."""
    loop = asyncio.get_running_loop()
    config = RouterConfig(mode=mode, block_size=args.block_size, overlap_weight=args.overlap_weight)
    router = KvRouter(config, seed=args.seed)
    engines = _make_engines(args)
    worker_ids = list(range(len(engines)))
    for wid, engine in enumerate(engines):
        engine.kv_events().subscribe(_event_sink(router, wid))
        await engine.start()
    records: list[RequestRecord] = []
    errors = 0
    speedup = args.speedup
    computed: set[int] = set()  # every block any worker has computed so far (the oracle)

    def reusable(prompt: list[int], hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in computed:
                break
            n += 1
        return min(n * args.block_size, len(prompt) - 1)  # the last token is always computed

    async def publish_load() -> None:
        while True:
            for wid, engine in enumerate(engines):
                router.update_load(engine.load_metrics(wid))
            await asyncio.sleep(args.metrics_interval)

    async def run_session(s: Session, t0: float) -> None:
        nonlocal errors
        delay = t0 + s.arrival_s / speedup - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        system = workload.system_prompts[s.system]
        history = list(system)
        for turn, user in enumerate(s.user_messages):
            room = args.max_prompt - len(history)
            if room < args.block_size:
                return  # the conversation filled the context: the session ends here
            prompt = history + user[:room]
            rid = f"s{s.index}-t{turn}"
            prompt_hashes = block_hashes_int(prompt, args.block_size)
            could_reuse = reusable(prompt, prompt_hashes)
            decision = router.choose(prompt, worker_ids, request_id=rid)
            engine = engines[decision.worker_id]
            request = PreprocessedRequest(
                request_id=rid,
                model="mocker",
                token_ids=prompt,
                stop=StopConditions(max_tokens=s.max_tokens[turn]),
            )
            sent = loop.time()
            first: float | None = None
            cached = 0
            sim_ttft = math.nan
            answer: list[int] = []
            try:
                async for out in engine.generate(request):
                    if first is None:
                        first = loop.time()
                        cached = out.cached_tokens or 0
                        computed.update(prompt_hashes)
                        ttft = engine.simulated_ttft_ms(rid)
                        sim_ttft = math.nan if ttft is None else ttft
                    answer.extend(out.token_ids)
            except EngineError as exc:
                print(f"  {mode}: {rid} failed: {exc}", file=sys.stderr)
                errors += 1
                return
            finally:
                router.release(rid)  # as the Processor does when the stream ends
            assert first is not None
            records.append(
                RequestRecord(
                    session=s.index,
                    turn=turn,
                    worker=decision.worker_id,
                    prompt_tokens=len(prompt),
                    system_tokens=len(system),
                    cached_tokens=cached,
                    reusable_tokens=could_reuse,
                    predicted_cached_tokens=decision.overlap_blocks * args.block_size,
                    output_tokens=len(answer),
                    sim_ttft_ms=sim_ttft,
                    wall_ttft_ms=(first - sent) * 1000 * speedup,
                )
            )
            history = prompt + answer
            computed.update(block_hashes_int(history, args.block_size))
            await asyncio.sleep(s.think_s[turn] / speedup)

    publisher = asyncio.create_task(publish_load())
    proc = psutil.Process()
    cpu0 = proc.cpu_times()
    t0 = loop.time()
    try:
        await asyncio.gather(*(run_session(s, t0) for s in workload.sessions))
    finally:
        wall = loop.time() - t0
        cpu1 = proc.cpu_times()
        publisher.cancel()
        for engine in engines:
            await engine.shutdown()
    result = summarize(mode, records, engines, wall, speedup)
    result.errors = errors
    result.cpu_share = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
    return result


def summarize(
    mode: str,
    records: list[RequestRecord],
    engines: list[MockerEngine],
    wall_s: float,
    speedup: float,
) -> ModeResult:
    r = ModeResult(mode=mode, requests=len(records), wall_s=wall_s)
    r.prompt_tokens = sum(x.prompt_tokens for x in records)
    r.cached_tokens = sum(x.cached_tokens for x in records)
    r.hit_rate = r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0.0
    beyond = sum(x.prompt_tokens - x.system_tokens for x in records)
    beyond_hit = sum(max(0, x.cached_tokens - x.system_tokens) for x in records)
    r.history_hit_rate = beyond_hit / beyond if beyond else 0.0
    reusable = sum(x.reusable_tokens for x in records)
    r.reusable_rate = reusable / r.prompt_tokens if r.prompt_tokens else 0.0
    predicted = sum(min(x.predicted_cached_tokens, x.prompt_tokens) for x in records)
    r.predicted_hit_rate = predicted / r.prompt_tokens if r.prompt_tokens else 0.0
    sim = [x.sim_ttft_ms for x in records if not math.isnan(x.sim_ttft_ms)]
    wall = [x.wall_ttft_ms for x in records]
    r.sim_ttfts_ms = sim
    r.ttft_p50_ms, r.ttft_p90_ms, r.ttft_p99_ms = (_percentile(sim, q) for q in (50, 90, 99))
    r.wall_ttft_p50_ms, r.wall_ttft_p99_ms = (_percentile(wall, q) for q in (50, 99))
    r.output_tokens = sum(x.output_tokens for x in records)
    r.sim_duration_s = wall_s * speedup
    r.output_tok_per_s = r.output_tokens / r.sim_duration_s if r.sim_duration_s else 0.0
    busy = [e.simulated_time_ms / 1000 for e in engines]
    r.busy_gpu_s = sum(busy)
    r.max_worker_busy_share = max(busy) / (sum(busy) / len(busy)) if sum(busy) else 0.0
    r.requests_per_worker = [sum(x.worker == w for x in records) for w in range(len(engines))]
    r.preemptions = sum(e.num_preemptions for e in engines)
    for turn in sorted({x.turn for x in records}):
        rows = [x for x in records if x.turn == turn]
        prompt = sum(x.prompt_tokens for x in rows)
        r.by_turn.append(
            {
                "turn": turn + 1,
                "requests": len(rows),
                "mean_prompt_tokens": prompt / len(rows),
                "hit_rate": sum(x.cached_tokens for x in rows) / prompt,
                "ttft_p50_ms": _percentile([x.sim_ttft_ms for x in rows], 50),
            }
        )
    return r


# ---- part 2: the decision cost ---------------------------------------------------------------


@dataclass
class DecisionRow:
    mix: str
    decisions_per_s: float
    p50_ms: float
    p99_ms: float
    hash_p50_ms: float
    hash_mean_ms: float
    find_p50_ms: float
    find_p99_ms: float
    find_mean_ms: float
    rest_p50_ms: float  # choose - hash - find (p50s): the cost loop, load, bookkeeping
    rest_mean_ms: float  # the same from the means
    workers_matched: float  # mean workers with overlap > 0


@dataclass
class DecisionResult:
    workers: int
    block_size: int
    index_blocks: int
    block_worker_pairs: int
    fill_s: float
    fill_blocks_per_s: float
    index_rss_mib: float
    index_bytes_per_block: float
    rows: list[DecisionRow] = field(default_factory=list)


def _fill_index(
    router: KvRouter, args: argparse.Namespace, rng: random.Random
) -> tuple[list[list[int]], DecisionResult]:
    """Fill the router's index; returns the real prompts whose hashes it holds."""
    n_workers = args.decision_workers
    prompts = [_tokens(rng, DECISION_PROMPT_TOKENS) for _ in range(64)]
    chains = [block_hashes_int(p, args.block_size) for p in prompts]
    n_chains = max(len(chains), args.index_blocks // CHAIN_BLOCKS)
    chains += [
        [rng.getrandbits(64) for _ in range(CHAIN_BLOCKS)] for _ in range(n_chains - len(chains))
    ]
    seqs = [0] * n_workers
    batches: list[KvEventBatch] = []
    pairs = 0
    for chain in chains:
        holders = rng.sample(range(n_workers), rng.randint(1, min(8, n_workers)))
        for i, worker in enumerate(holders):
            length = len(chain) if i == 0 or rng.random() < 0.5 else rng.randint(1, len(chain))
            event = BlockStored(chain[:length], None, [], args.block_size)
            batches.append(KvEventBatch(worker, seqs[worker], [event]))
            seqs[worker] += 1
            pairs += length
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    for batch in batches:
        router.indexer.apply(batch)
    fill_s = time.perf_counter() - t0
    rss = psutil.Process().memory_info().rss - rss0
    blocks = router.indexer.num_blocks()
    result = DecisionResult(
        workers=n_workers,
        block_size=args.block_size,
        index_blocks=blocks,
        block_worker_pairs=pairs,
        fill_s=fill_s,
        fill_blocks_per_s=pairs / fill_s,
        index_rss_mib=rss / 2**20,
        index_bytes_per_block=rss / blocks,
    )
    return prompts, result


def _queries(mix: str, prompts: list[list[int]], rng: random.Random, n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        base = rng.choice(prompts)
        if mix == "hit":
            out.append(base)
        elif mix == "partial":
            k = rng.randrange(1, CHAIN_BLOCKS) * DECISION_PROMPT_TOKENS // CHAIN_BLOCKS
            out.append(base[:k] + _tokens(rng, DECISION_PROMPT_TOKENS - k))
        else:
            out.append(_tokens(rng, DECISION_PROMPT_TOKENS))
    return out


def _time_ms(fn: Callable[[], object]) -> float:
    s = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - s) / 1e6


def measure_decisions(args: argparse.Namespace) -> DecisionResult:
    rng = random.Random(args.seed + 1)
    router = KvRouter(RouterConfig(mode="kv", block_size=args.block_size), seed=args.seed)
    prompts, result = _fill_index(router, args, rng)
    workers = list(range(args.decision_workers))
    index = router.indexer
    bs = args.block_size
    last_load = 0.0

    def refresh_load() -> None:
        nonlocal last_load
        now = time.monotonic()
        if now - last_load >= 0.05:  # as workers publish metrics: clears pending assignments
            for w in workers:
                active = rng.randrange(2000)
                router.update_load(LoadMetrics(w, active / 4096, active, 4096, 8, 0), now)
            last_load = now

    for mix in ("hit", "partial", "miss"):
        # a pool of distinct prompts, cycled (a 4096-int list per decision would not fit in RAM)
        pool = _queries(mix, prompts, rng, 256)
        queries = [pool[i % len(pool)] for i in range(args.decisions)]
        hashed = [block_hashes_int(q, bs) for q in pool]
        for q in queries[:50]:  # warm up
            refresh_load()
            router.release("warm")
            router.choose(q, workers, request_id="warm")
        gc.collect()
        hash_ms: list[float] = []
        find_ms: list[float] = []
        for i, q in enumerate(queries):
            hash_ms.append(_time_ms(partial(block_hashes_int, q, bs)))
            find_ms.append(_time_ms(partial(index.find_matches, hashed[i % len(pool)])))
        matched = sum(len(index.find_matches(h)) for h in hashed) / len(hashed)
        choose_ms: list[float] = []
        for q in queries:
            refresh_load()
            choose_ms.append(_time_ms(partial(router.choose, q, workers, "timed")))
        mean_choose = sum(choose_ms) / len(choose_ms)
        mean_hash = sum(hash_ms) / len(hash_ms)
        mean_find = sum(find_ms) / len(find_ms)
        choose_p50, hash_p50, find_p50 = (
            _percentile(xs, 50) for xs in (choose_ms, hash_ms, find_ms)
        )
        result.rows.append(
            DecisionRow(
                mix=mix,
                decisions_per_s=1000 / mean_choose,
                p50_ms=choose_p50,
                p99_ms=_percentile(choose_ms, 99),
                hash_p50_ms=hash_p50,
                hash_mean_ms=mean_hash,
                find_p50_ms=find_p50,
                find_p99_ms=_percentile(find_ms, 99),
                find_mean_ms=mean_find,
                rest_p50_ms=max(0.0, choose_p50 - hash_p50 - find_p50),
                rest_mean_ms=max(0.0, mean_choose - mean_hash - mean_find),
                workers_matched=matched,
            )
        )
    return result


# ---- report ----------------------------------------------------------------------------------


@dataclass
class Results:
    settings: dict[str, Any] = field(default_factory=dict)
    modes: list[ModeResult] = field(default_factory=list)
    decision: DecisionResult | None = None
    targets: list[Target] = field(default_factory=list)


def evaluate_targets(results: Results) -> list[Target]:
    by_mode = {m.mode: m for m in results.modes}
    rr, kv = by_mode.get("round_robin"), by_mode.get("kv")
    ttft_ratio = hit_ratio = None
    if rr is not None and kv is not None:
        if kv.ttft_p50_ms > 0:
            ttft_ratio = rr.ttft_p50_ms / kv.ttft_p50_ms
        if rr.hit_rate > 0:
            hit_ratio = kv.hit_rate / rr.hit_rate
    d = results.decision
    worst = max((row.p99_ms for row in d.rows), default=None) if d is not None else None
    return [
        check(
            f"kv TTFT p50 >= {TARGET_TTFT_RATIO:g}x lower than round_robin (rr/kv)",
            ttft_ratio,
            "x",
            lambda v: v >= TARGET_TTFT_RATIO,
        ),
        check(
            f"kv prefix hit rate >= {TARGET_HIT_RATIO:g}x round_robin (kv/rr)",
            hit_ratio,
            "x",
            lambda v: v >= TARGET_HIT_RATIO,
        ),
        check(
            f"decision p99 < {TARGET_DECISION_P99_MS:g} ms (4096 tokens, all mixes)",
            worst,
            "ms",
            lambda v: v < TARGET_DECISION_P99_MS,
        ),
    ]


def format_report(results: Results) -> str:
    out: list[str] = []
    if results.modes:
        out.append("routing (simulated ms unless noted; wall TTFT x speedup):")
        header = (
            "mode",
            "reqs",
            "hit rate",
            "hist hit",
            "reusable",
            "pred hit",
            "TTFT p50",
            "p90",
            "p99",
            "wall p50",
            "wall p99",
            "out tok/s",
            "busy GPU-s",
            "max/mean busy",
            "preempt",
            "run s",
            "CPU",
        )
        rows = [
            (
                m.mode,
                f"{m.requests}" + (f" ({m.errors} err)" if m.errors else ""),
                f"{m.hit_rate:.1%}",
                f"{m.history_hit_rate:.1%}",
                f"{m.reusable_rate:.1%}",
                f"{m.predicted_hit_rate:.1%}",
                f"{m.ttft_p50_ms:.1f}",
                f"{m.ttft_p90_ms:.1f}",
                f"{m.ttft_p99_ms:.1f}",
                f"{m.wall_ttft_p50_ms:.1f}",
                f"{m.wall_ttft_p99_ms:.1f}",
                f"{m.output_tok_per_s:,.0f}",
                f"{m.busy_gpu_s:.1f}",
                f"{m.max_worker_busy_share:.2f}",
                f"{m.preemptions}",
                f"{m.wall_s:.1f}",
                f"{m.cpu_share:.0%}",
            )
            for m in results.modes
        ]
        out += table(header, rows)
        out.append("")
        out.append("by turn (hit rate / simulated TTFT p50 ms):")
        turns = max(len(m.by_turn) for m in results.modes)
        header2 = ("mode", *(f"turn {t + 1}" for t in range(turns)))
        rows2 = []
        for m in results.modes:
            cells = [f"{b['hit_rate']:.0%} / {b['ttft_p50_ms']:.0f}" for b in m.by_turn]
            rows2.append((m.mode, *cells, *[""] * (turns - len(cells))))
        prompt_cells = [f"{b['mean_prompt_tokens']:,.0f} tok" for b in results.modes[0].by_turn]
        rows2.append(("mean prompt", *prompt_cells, *[""] * (turns - len(prompt_cells))))
        out += table(header2, rows2)
        for m in results.modes:
            out.append(f"{m.mode} requests per worker: {m.requests_per_worker}")
            if m.cpu_share > CPU_WARN:
                out.append(
                    f"WARNING: {m.mode} used {m.cpu_share:.0%} of a CPU: steps may have been "
                    "stretched; lower --speedup or --rate for trustworthy simulated figures"
                )
        out.append("")
    d = results.decision
    if d is not None:
        out.append(
            f"decision cost: {d.workers} workers, index {d.index_blocks:,} blocks "
            f"({d.block_worker_pairs:,} block-worker pairs) filled in {d.fill_s:.1f} s = "
            f"{d.fill_blocks_per_s:,.0f} pairs/s; index memory (RSS delta) "
            f"{d.index_rss_mib:,.0f} MiB = {d.index_bytes_per_block:.0f} B/block"
        )
        header3 = (
            "mix",
            "decisions/s",
            "p50 ms",
            "p99 ms",
            "hash p50",
            "find p50",
            "find p99",
            "rest p50",
            "workers hit",
        )
        rows3 = [
            (
                r.mix,
                f"{r.decisions_per_s:,.0f}",
                f"{r.p50_ms:.3f}",
                f"{r.p99_ms:.3f}",
                f"{r.hash_p50_ms:.3f}",
                f"{r.find_p50_ms:.3f}",
                f"{r.find_p99_ms:.3f}",
                f"{r.rest_p50_ms:.3f}",
                f"{r.workers_matched:.1f}",
            )
            for r in d.rows
        ]
        out += table(header3, rows3)
        if d.rows:
            share = sum(r.hash_p50_ms for r in d.rows) / sum(r.p50_ms for r in d.rows)
            out.append(
                f"split (p50s; rest = choose - hash - find: costs, load, bookkeeping): hashing "
                f"(sha256+cbor per {d.block_size}-token block) is {share:.0%} of a decision"
            )
        out.append("")
    out += format_targets(results.targets)
    by_mode = {m.mode: m for m in results.modes}
    rr, kv = by_mode.get("round_robin"), by_mode.get("kv")
    if rr is not None and kv is not None and rr.hit_rate > 0 and kv.reusable_rate > 0:
        out.append(
            f"  (no router can beat the reusable rate: on this workload the hit-rate ratio is "
            f"capped at {kv.reusable_rate / rr.hit_rate:.2f}x; kv reached "
            f"{kv.hit_rate / kv.reusable_rate:.0%} of the reusable tokens)"
        )
    return "\n".join(out)


def write_png(results: Results, path: Path) -> bool:
    """TTFT CDFs of both modes (and p50 by turn); False if matplotlib is not installed."""
    cdfs, by_turn = [], []
    turns: list[int] = []
    for m in results.modes:
        xs = sorted(m.sim_ttfts_ms)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        label = f"{m.mode} (p50 {m.ttft_p50_ms:.0f} ms, hit {m.hit_rate:.0%})"
        cdfs.append(Series(label, xs, ys))
        turns = [b["turn"] for b in m.by_turn]
        by_turn.append(Series(m.mode, turns, [b["ttft_p50_ms"] for b in m.by_turn]))
    s = results.settings
    panels = [
        Panel(
            cdfs,
            "TTFT, simulated ms (log)",
            "fraction of requests",
            "TTFT CDF",
            kind="step",
            xscale="log",
            grid=True,
        ),
        Panel(
            by_turn, "turn", "TTFT p50, simulated ms", "TTFT p50 by turn", grid=True, xticks=turns
        ),
    ]
    suptitle = (
        f"{s.get('sessions')} sessions x {s.get('turns')} turns, {s.get('workers')} mocker "
        f"workers, {s.get('rate')} sessions/s"
    )
    return plot_panels(path, panels, suptitle, size=(12, 4.5), dpi=110) is not None


# ---- entry point -----------------------------------------------------------------------------


def _span(text: str) -> tuple[int, int]:
    """ "64-128" -> (64, 128); "96" -> (96, 96)."""
    try:
        lo, _, hi = text.partition("-")
        span = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if span[0] < 1 or span[1] < span[0]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return span


QUICK = {"sessions": 20, "turns": 2, "workers": 4, "rate": 2.0, "decisions": 300}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rate", type=float, default=4.0, help="sessions per simulated second")
    p.add_argument("--think", type=float, default=0.5, help="mean think time, simulated s")
    p.add_argument("--osl", type=_span, default=(64, 128), help="output tokens, N or LO-HI")
    p.add_argument("--system-prompts", type=int, default=8)
    p.add_argument("--system-tokens", type=_span, default=(500, 1500))
    p.add_argument("--first-user-tokens", type=_span, default=(300, 1000))
    p.add_argument("--user-tokens", type=_span, default=(100, 500))
    p.add_argument("--max-prompt", type=int, default=4096, help="prompt cap, tokens")
    p.add_argument("--num-blocks", type=int, default=2048, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--overlap-weight", type=float, default=1.0, help="RouterConfig.overlap_weight (kv)"
    )
    p.add_argument("--speedup", type=float, default=1.0, help="simulated s per wall s")
    p.add_argument("--metrics-interval", type=float, default=0.05, help="wall s")
    p.add_argument("--decision-workers", type=int, default=64)
    p.add_argument("--index-blocks", type=int, default=1_000_000)
    p.add_argument("--decisions", type=int, default=3000, help="timed decisions per mix")
    p.add_argument(
        "--part", choices=("all", "routing", "decision"), default="all", help="what to run"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument(
        "--png", type=Path, default=Path(__file__).with_name("router_bench.png"), help="TTFT plot"
    )
    p.add_argument("--no-png", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()) + ", 100k-block index",
    )
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
        if args.index_blocks == p.get_default("index_blocks"):
            args.index_blocks = 100_000
    positive = ("sessions", "turns", "workers", "num_blocks", "block_size", "decision_workers")
    if any(getattr(args, k) < 1 for k in positive) or args.decisions < 1:
        p.error(f"--{', --'.join(k.replace('_', '-') for k in positive)} and --decisions >= 1")
    if args.rate <= 0 or args.speedup <= 0 or args.think < 0 or args.metrics_interval <= 0:
        p.error("--rate, --speedup and --metrics-interval must be > 0, --think >= 0")
    context = args.max_prompt + args.osl[1] + args.block_size
    if context > args.num_blocks * args.block_size:
        p.error(
            f"--num-blocks {args.num_blocks} x {args.block_size} cannot hold one context of "
            f"{context} tokens (--max-prompt + max --osl)"
        )
    return args


async def _run_modes(workload: Workload, args: argparse.Namespace) -> list[ModeResult]:
    results = []
    for mode in MODES:
        print(f"  ... {mode}: {len(workload.sessions)} sessions", file=sys.stderr)
        results.append(await run_mode(mode, workload, args))
        gc.collect()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results()
    results.settings = {
        k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
    }
    results.settings.update(python=platform.python_version(), cpus=os.cpu_count())
    if args.part in ("all", "routing"):
        workload = make_workload(args)
        results.modes = uvloop.run(_run_modes(workload, args))
    if args.part in ("all", "decision"):
        print("  ... decision cost", file=sys.stderr)
        results.decision = measure_decisions(args)
    results.targets = evaluate_targets(results)
    print(format_report(results))
    if results.modes and not args.no_png:
        if write_png(results, args.png):
            print(f"\nTTFT plot: {args.png}")
        else:
            print("\n(no plot: matplotlib is not installed)")
    if args.json is not None:
        data = asdict(results)
        args.json.write_text(json.dumps(json_safe(data), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
