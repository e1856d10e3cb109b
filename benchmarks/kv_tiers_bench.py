"""Multi-tier KV cache (device, host, disk, shared) under multi-turn chat, with the KV router.

Everything runs in ONE process with no NATS or etcd, as in ``router_bench.py``: in-process
engines, KV events from each engine straight into a `KvRouter`'s indexer (``KvEventBatch``;
the tiers' events carry their ``medium``, so a tier-aware router knows what each worker holds
in host memory, on disk and in shared storage), load metrics copied into the router every
``--metrics-interval`` wall seconds, as a worker would publish them.

Workload
--------
``router_bench.make_workload`` (seeded by ``--seed``): ``--sessions`` 200 conversations of
``--turns`` 6 turns; turn k's prompt is a shared system prompt (one of ``--system-prompts``
8), every earlier user message and the answer the engine generated, then a new user message
(64-128 output tokens). ``--workload`` picks the prompts' lengths:

* ``context`` (the default): what the tiers are for, a long private context per session
  (a document, a code base, an agent's notes) followed by short questions: system prompts of
  100-400 tokens, a first message of 1500-3000, then 50-200; prompts up to 8192 tokens.
* ``chat``: ``router_bench.py``'s chat mix: system prompts of 500-1500 tokens (their hits
  stay on the device: ~40% of prompt tokens), a first message of 300-1000, then 100-500; up to
  4096. Here a tier's gain is bounded by the history's share of each prompt, and device-only
  keeps ~48% of the ceiling.

``--system-tokens``, ``--first-user-tokens``, ``--user-tokens`` and ``--max-prompt`` override
a preset's lengths. Sessions arrive at ``--rate`` 10 per simulated second and think
``--think`` 20 simulated seconds (exponential mean) between an answer and the next turn:
long enough that the other
sessions' traffic evicts a session's KV from the device before it comes back (checked: the
share of follow-up turns' reusable history that the device-only arm did not find on the
device), at a moderate load (the device-only GPUs ~30-40% busy). The KV working set
(distinct blocks computed: ~42k for ``context``, ~34k for ``chat``) is >= 8x the cluster's
device cache (``--num-blocks`` 960 per worker; checked and printed).

Arms (one run; fresh engines, router and storage folders per arm; the same workload)
------------------------------------------------------------------------------------
* ``device``: the device cache only (G1).
* ``host``: plus a host-memory tier (G2) of ``--host-blocks`` per worker (default 4x the device
  cache: ``write_through``, the default policy, needs it larger than the device).
* ``host+disk``: plus a local-disk tier (G3) of ``--disk-blocks`` per worker (default: room for
  the whole working set), each worker in its own folder, with the library's default admission
  (``disk_kv_admission`` 2, ``--disk-admission``: once the disk is full, a block goes to disk
  only once offered twice; any block while it has room).
* ``host+disk adm1`` (``--adm1``): the same with ``disk_kv_admission`` 1 (every block goes to
  disk); differs from ``host+disk`` only once the disk fills (a ``--disk-blocks`` below the
  working set).
* ``host+disk GPU-router``: the ``host+disk`` engines under ``RouterConfig(tier_aware=False)``:
  the router as it was before tiers, crediting device hits only.
* ``shared``: host memory plus one shared folder (G4: ``file://<tmp>``, or ``--shared-uri``,
  which must start empty) common to all workers, no disk. The issue says "(2 workers)": this
  arm runs the same ``--workers`` (4) as the others by default (``--shared-workers`` 2 runs
  the issue's), so that its TTFT and throughput compare with theirs at the same load per
  worker; a block one worker stored is then loadable by three others, and sessions move
  between workers anyway (the ``moved`` column: follow-ups served by another worker than the
  previous turn, ~55% under the kv router's default weights).

Every arm routes with the kv router (``RouterConfig(mode="kv")``, its default weights but
``--overlap-weight`` 2.0, as ``configs/agg_router_tiers.yaml`` sets it: at the router's
default 1.0, ~31% of follow-ups move to another worker and leave their host blocks behind;
tier-aware unless noted).

Engines
-------
* The mocker (``--workers`` 4): its tiers are the real stack (host index, files, shared
  folder), its blocks have no bytes, and a load's time is simulated with the ``MockerConfig``
  defaults, kept as they are (printed with the results): 2 MiB per 16-token block (an 8B
  model), host 25 GB/s + 0.05 ms per load, disk 3 GB/s + 0.2 ms, shared 1 GB/s + 1 ms (disk
  and shared then pay the host copy too), against prefill at 0.05 ms per token. So a disk load
  (0.78 ms per block) costs about what recomputing the block costs (0.8 ms): a disk hit frees
  GPU time, it barely shortens that request's own TTFT. ``--speedup`` 5 simulated s per wall
  s. The real I/O of a load is not charged to the simulated clock, but the requests queued
  behind it wait for it in wall time (x the speedup on the simulated clock): the mocker's
  folders go to ``/dev/shm`` (``--mocker-storage``; a file write there costs ~25 us instead
  of ~280 us on this machine's disk), the GIL switch interval is shortened while the arms run
  (four engines' I/O threads share one GIL here, unlike a worker process), and the tier table
  prints each tier's real load time over its simulated time (``real/sim``; a warning above
  0.8: lower ``--speedup``).
* The torch engine (``--torch-workers`` 2) on the CPU with the tiny model
  (``build_tiny_model``), at a much smaller scale (``--torch-*``: 20 sessions x 4 turns,
  prompts of 150-600 tokens, a 40-block device cache, ``disk_kv_admission`` 1, folders on the
  real disk) and wall-clock time; arms ``device``, ``host+disk`` and ``shared``. Greedy:
  every answer with tiers must equal the device arm's answer to the same (session, turn),
  token for token (the device arm's answers do not depend on its cache size: checked with a
  1200-block device, which never evicts).
* ``--torch-device cuda`` (the GPU-measurements issue): the torch engine on one GPU, the
  Llama-3-8B shape with dummy bf16 weights, histories of 8-24k tokens (`torch_gpu_scale`:
  18 sessions x 4 turns, a 2,048-block device cache, a working set ~8.7x it), arms
  ``device``, ``host``, ``host+disk`` and ``shared`` on 2 workers (sharing the GPU). bf16
  answers depend on the batch, so the exactness target is the CPU run's only;
  ``kv_tiers_gpu_bench.py`` checks the GPU copies bit for bit and times each tier's TTFT.

Guards (three library bugs this benchmark found, all fixed since)
-----------------------------------------------------------------
`watch_wakeups`: the torch engine's step loop could go to sleep with a request queued (a lost
wakeup while it copied the last step's blocks to the host tier; fixed in 489f1de). The guard
still wakes a stalled engine within 10 ms (``--no-workarounds``: after 1 s) and counts stalls,
so a regression shows as a count instead of a hang. `count_load_races` counts loads started
into device blocks whose copy out of the device was still due (a load alone in the engine used
to overwrite them first; fixed in ad7107f); the torch exactness target would catch the
answers that then differ. ``lost`` below exposed the third: a queued request that had to wait
for device blocks was never loaded from the tiers (fixed in ``Scheduler._try_onboarding``).

Measures (per arm)
------------------
hit rate (engines' ``cached_tokens`` of each request's first output over prompt tokens) and
its split by tier: GPU from the engines' device prefix hits, CPU/DISK/SHARED from the tiers'
``hit_tokens`` (shares of all prompt tokens); the reusable ceiling (the prefix that requests
had computed anywhere by this one's first token: one worker with an infinite cache, which
nothing can beat) and hit / ceiling, for all requests and split between follow-ups that
stayed on their worker and those that moved; the router's predicted hit rate (its tiered
overlap of the chosen worker); ``lost``: tokens the chosen worker held on device, host or disk
when the request was routed but recomputed (evicted meanwhile, or not loaded); TTFT
p50/p90/p99 (mocker: its simulated clock, ``simulated_ttft_ms``; torch: wall ms); output
tokens/s (mocker: over simulated seconds, wall x ``--speedup``); the GPUs' busy share (mocker:
simulated step time over the run); preemptions; errors; wall time of the arm and of its
teardown; host CPU use. Per tier: hits, loads, blocks onboarded, offloaded, evicted, corrupt,
errors, declined (prompts whose blocks there were recomputed: the timing model says reading
them is slower, see ``kv/tiers/costs.py``), real load time.

Targets (mocker; the issue's): ``host+disk`` reaches >= 95% of the ceiling while ``device``
stays below 40% of it; ``device`` TTFT p50 >= 5x ``host+disk``'s; the GPU-only router >= 20
points of hit rate below the tier-aware one on the same tiers. Torch: every tiered answer
equals the device arm's. Workload checks (preconditions, not targets): the working set is >=
8x the device cache; >= 80% of the follow-ups' reusable history was gone from the device.

Usage::

    python benchmarks/kv_tiers_bench.py [--sessions 200] [--turns 6] [--workers 4] [--seed 0]
        [--part all|mocker|torch] [--json out.json] [--png benchmarks/kv_tiers_bench.png]
        [--no-workarounds] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
import msgspec
import psutil
import uvloop
from _common import json_safe
from harness.plot import pyplot, save
from harness.report import Target, check, format_targets, table
from router_bench import CPU_WARN, VOCAB, Workload, _event_sink, _percentile, _span, make_workload

from dynamo_sdk.llm.engines.base import Engine, EngineError
from dynamo_sdk.llm.engines.configs import MockerConfig
from dynamo_sdk.llm.engines.mocker import MockerEngine
from dynamo_sdk.llm.engines.scheduler import Scheduler
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig
from dynamo_sdk.llm.kv.tiers.stack import LoadPlan, TierStack
from dynamo_sdk.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions

MEDIUMS = ("CPU", "DISK", "SHARED")
TIER_LABELS = {"GPU": "GPU", "CPU": "host", "DISK": "disk", "SHARED": "shared"}
TIER_COLORS = {"GPU": "#2ca02c", "CPU": "#1f77b4", "DISK": "#ff7f0e", "SHARED": "#9467bd"}

# the targets (mocker) and the workload's preconditions
TARGET_CEILING_SHARE = 0.95  # host+disk hit rate / ceiling
TARGET_DEVICE_MAX_SHARE = 0.40  # device-only hit rate / ceiling stays below
TARGET_TTFT_RATIO = 5.0  # device-only TTFT p50 / host+disk TTFT p50
TARGET_ROUTER_POINTS = 0.20  # tier-aware hit rate - GPU-only router hit rate
WORKING_SET_RATIO = 8.0  # distinct blocks computed / cluster device cache
EVICTED_SHARE = 0.80  # follow-ups' reusable history not on the device (device arm)
IO_WARN = 0.8  # a mocker tier's real load time over its simulated time, beyond which we warn
# Four engines share this process, and their tiers' I/O threads wait for the GIL behind the
# event loop running all of them: 5 ms at a time by default, which makes every file a load
# reads cost up to 5 ms of wall time (x --speedup on the simulated clock). A worker process
# has one engine; a shorter switch interval keeps this artefact of the benchmark small.
SWITCH_INTERVAL_S = 0.0005
WATCHDOG_S = 0.01  # see watch_wakeups
WATCHDOG_AS_IS_S = 1.0

DEVICE, HOST, HOST_DISK, HOST_DISK_ADM1, GPU_ROUTER, SHARED = (
    "device",
    "host",
    "host+disk",
    "host+disk adm1",
    "host+disk GPU-router",
    "shared",
)
DEVICE_BIG = "device, no eviction"  # torch: the reference whose answers the device arm's match
TORCH_BIG_DEVICE_BLOCKS = 1200
# The mocker's timing fitted to one H200 (benchmarks/NOTES.md, 2026-12-02, Llama-3-8B shape):
# recompute of 8k/16k/32k-token prompts in 280/680/1,940 ms (a + b * context per token:
# within 5%), the host pool's loads at 46 GB/s (+0.08 ms a load at 16 blocks), records read
# from the page cache at 6.9 GB/s on 8 threads. Decode and shared storage keep the defaults.
MOCKER_TIMINGS: dict[str, dict[str, float]] = {
    "h200": {
        "prefill_ms_per_token": 0.027,
        "prefill_ms_quadratic": 1.8e-6,
        "host_kv_gbps": 46.0,
        "host_kv_latency_ms": 0.08,
        "disk_kv_gbps": 6.9,
    },
}


# ---- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """One engine's workload and cluster (the mocker's, or the torch engine's smaller one)."""

    engine: str  # mocker | torch
    sessions: int
    turns: int
    workers: int
    rate: float  # sessions per simulated second
    think: float  # mean simulated seconds between an answer and the next turn
    osl: tuple[int, int]
    system_prompts: int
    system_tokens: tuple[int, int]
    first_user_tokens: tuple[int, int]
    user_tokens: tuple[int, int]
    max_prompt: int
    block_size: int
    num_blocks: int  # device blocks per worker
    host_blocks: int
    disk_blocks: int
    disk_admission: int
    shared_workers: int
    shared_uri: str  # '' = a fresh file:// folder per arm
    storage_root: str  # where the arms' disk and shared folders go ('' = the temp dir)
    overlap_weight: float  # RouterConfig.overlap_weight
    speedup: float  # simulated s per wall s (torch: 1, wall time)
    metrics_interval: float
    watchdog_s: float  # how often a stalled torch engine is woken (see watch_wakeups)
    seed: int
    timing: str = "default"  # the mocker's timing model: MockerConfig's defaults, or MOCKER_TIMINGS

    @property
    def context(self) -> int:
        return self.max_prompt + self.osl[1] + self.block_size


@dataclass(frozen=True)
class Arm:
    name: str
    workers: int
    host: bool = False
    disk: bool = False
    shared: bool = False
    tier_aware: bool = True
    admission: int = 2
    device_blocks: int = 0  # 0: the scale's num_blocks


def mocker_arms(scale: Scale, adm1: bool) -> list[Arm]:
    w, adm = scale.workers, scale.disk_admission
    arms = [
        Arm(DEVICE, w),
        Arm(HOST, w, host=True),
        Arm(HOST_DISK, w, host=True, disk=True, admission=adm),
    ]
    if adm1 and adm != 1:
        arms.append(Arm(HOST_DISK_ADM1, w, host=True, disk=True, admission=1))
    arms += [
        Arm(GPU_ROUTER, w, host=True, disk=True, tier_aware=False, admission=adm),
        Arm(SHARED, scale.shared_workers, host=True, shared=True),
    ]
    return arms


def torch_arms(scale: Scale, gpu: bool) -> list[Arm]:
    w = scale.workers
    if gpu:  # the GPU-measurements issue's four arms
        return [
            Arm(DEVICE, w),
            Arm(HOST, w, host=True),
            Arm(HOST_DISK, w, host=True, disk=True, admission=scale.disk_admission),
            Arm(SHARED, scale.shared_workers, host=True, shared=True),
        ]
    return [
        Arm(DEVICE, w),
        Arm(DEVICE_BIG, w, device_blocks=TORCH_BIG_DEVICE_BLOCKS),
        Arm(HOST_DISK, w, host=True, disk=True, admission=scale.disk_admission),
        Arm(SHARED, scale.shared_workers, host=True, shared=True),
    ]


def tier_knobs(arm: Arm, scale: Scale, root: Path, worker: int) -> dict[str, Any]:
    """The `KvTierConfig` keys of one worker of `arm` (its disk folder its own)."""
    knobs: dict[str, Any] = {}
    if arm.host:
        knobs["host_kv_blocks"] = scale.host_blocks
    if arm.disk:
        folder = root / f"disk-{worker}"
        knobs.update(
            disk_kv_blocks=scale.disk_blocks,
            disk_kv_path=str(folder),
            disk_kv_admission=arm.admission,
        )
    if arm.shared:
        knobs["shared_kv"] = scale.shared_uri or f"file://{root / 'shared'}"
    return knobs


def workload_for(scale: Scale, vocab: int) -> Workload:
    """`router_bench.make_workload` at this scale; ids folded into the model's vocabulary."""
    names = (
        "seed sessions turns rate think osl system_prompts system_tokens first_user_tokens "
        "user_tokens"
    ).split()
    workload = make_workload(argparse.Namespace(**{k: getattr(scale, k) for k in names}))
    if vocab < VOCAB:
        workload.system_prompts = [[t % vocab for t in p] for p in workload.system_prompts]
        for s in workload.sessions:
            s.user_messages = [[t % vocab for t in m] for m in s.user_messages]
    return workload


# ---- one arm ---------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    session: int
    turn: int
    worker: int
    moved: bool  # a follow-up served by another worker than the previous turn
    prompt_tokens: int
    system_tokens: int
    cached_tokens: int
    reusable_tokens: int  # prefix any request computed before its first token: the ceiling
    available_tokens: int  # held by the chosen worker on device/host/disk when routed
    predicted_tokens: int  # the router's overlap of the chosen worker, every tier it credits
    output_tokens: int
    ttft_ms: float  # mocker: simulated; torch: wall


@dataclass
class ArmResult:
    engine: str
    arm: str
    workers: int
    tier_aware: bool
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    hit_rate: float = 0.0
    tier_share: dict[str, float] = field(default_factory=dict)  # GPU/CPU/DISK/SHARED
    reusable_rate: float = 0.0
    ceiling_share: float = 0.0  # hit rate / reusable rate
    predicted_hit_rate: float = 0.0
    lost_rate: float = 0.0  # held locally when routed, recomputed anyway
    followup_device_evicted: float = math.nan  # reusable history of follow-ups not on device
    moved_share: float = 0.0
    stayed_ceiling_share: float = math.nan  # hit / ceiling of follow-ups on the same worker
    moved_ceiling_share: float = math.nan  # ... and of those moved to another worker
    ttft_p50_ms: float = math.nan
    ttft_p90_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    output_tokens: int = 0
    duration_s: float = 0.0  # mocker: simulated
    output_tok_per_s: float = 0.0
    busy_gpu_s: float = 0.0  # mocker: simulated step time summed
    busy_share: float = 0.0  # busy GPU-s / (duration x workers)
    preemptions: int = 0
    stalls: int = 0  # torch: lost wakeups found by watch_wakeups (a queued request, a loop asleep)
    loads: int = 0  # tier loads started (count_load_races)
    racing_loads: int = 0  # ... into device blocks whose copy out was still due
    racing_blocks: int = 0
    working_set_blocks: int = 0
    device_blocks: int = 0  # the cluster's device cache
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)  # summed KvTierStats
    wall_s: float = 0.0
    shutdown_s: float = 0.0  # engines stopped (tier writes still queued are finished)
    cleanup_s: float = 0.0  # the arm's storage folders removed
    cpu_share: float = 0.0
    answers: dict[str, list[int]] = field(default_factory=dict)  # torch: "s-t" -> tokens
    ttfts_ms: list[float] = field(default_factory=list)


EngineFactory = Callable[[Arm, Path], list[Engine]]
TtftOf = Callable[[Engine, str, float], float]  # (engine, request id, wall ms) -> ttft ms


async def run_arm(
    arm: Arm,
    scale: Scale,
    workload: Workload,
    make_engines: EngineFactory,
    ttft_of: TtftOf,
    keep_answers: bool,
) -> ArmResult:
    """Serve the whole workload with fresh engines, storage and router for `arm`."""
    loop = asyncio.get_running_loop()
    bs = scale.block_size
    config = RouterConfig(
        mode="kv", block_size=bs, tier_aware=arm.tier_aware, overlap_weight=scale.overlap_weight
    )
    router = KvRouter(config, seed=scale.seed)
    folder = tempfile.TemporaryDirectory(
        prefix=f"kv-tiers-{scale.engine}-", dir=scale.storage_root or None
    )
    with folder as tmp:
        engines = make_engines(arm, Path(tmp))
        worker_ids = list(range(len(engines)))
        for wid, engine in enumerate(engines):
            source = engine.kv_events()
            assert source is not None
            source.subscribe(_event_sink(router, wid))
            await engine.start()
        records: list[RequestRecord] = []
        answers: dict[str, list[int]] = {}
        errors = 0
        computed: set[int] = set()  # every block any worker has computed so far (the oracle)
        speedup = scale.speedup

        def reusable(prompt: list[int], hashes: list[int]) -> int:
            n = 0
            for h in hashes:
                if h not in computed:
                    break
                n += 1
            return min(n, (len(prompt) - 1) // bs) * bs  # the last token is always computed

        async def publish_load() -> None:
            while True:
                for wid, engine in enumerate(engines):
                    router.update_load(engine.load_metrics(wid))
                await asyncio.sleep(scale.metrics_interval)

        async def run_session(index: int, t0: float) -> None:
            nonlocal errors
            s = workload.sessions[index]
            delay = t0 + s.arrival_s / speedup - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            system = workload.system_prompts[s.system]
            history = list(system)
            previous: int | None = None
            for turn, user in enumerate(s.user_messages):
                room = scale.max_prompt - len(history)
                if room < bs:
                    return  # the conversation filled the context: the session ends here
                prompt = history + user[:room]
                rid = f"s{s.index}-t{turn}"
                prompt_hashes = block_hashes_int(prompt, bs)
                could_reuse = 0
                decision = router.choose(prompt, worker_ids, request_id=rid)
                engine = engines[decision.worker_id]
                held = min(engine.cached_prefix_tokens(prompt), (len(prompt) - 1) // bs * bs)
                tiers = decision.tiers
                predicted = tiers.total if tiers is not None else decision.overlap_blocks
                request = PreprocessedRequest(
                    request_id=rid,
                    model=scale.engine,
                    token_ids=prompt,
                    stop=StopConditions(max_tokens=s.max_tokens[turn], ignore_eos=True),
                    sampling=SamplingOptions(temperature=0.0),
                )
                sent = loop.time()
                first: float | None = None
                cached = 0
                answer: list[int] = []
                try:
                    async for out in engine.generate(request):
                        if first is None:
                            first = loop.time()
                            cached = out.cached_tokens or 0
                            # the ceiling: what was computed before this request's first
                            # token (anything it could have found when admitted, and more)
                            could_reuse = reusable(prompt, prompt_hashes)
                            computed.update(prompt_hashes)
                        answer.extend(out.token_ids)
                except EngineError as exc:
                    print(f"  {arm.name}: {rid} failed: {exc}", file=sys.stderr)
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
                        moved=previous is not None and previous != decision.worker_id,
                        prompt_tokens=len(prompt),
                        system_tokens=len(system),
                        cached_tokens=cached,
                        reusable_tokens=could_reuse,
                        available_tokens=held,
                        predicted_tokens=min(predicted * bs, len(prompt)),
                        output_tokens=len(answer),
                        ttft_ms=ttft_of(engine, rid, (first - sent) * 1000),
                    )
                )
                if keep_answers:
                    answers[f"{s.index}-{turn}"] = answer
                previous = decision.worker_id
                history = prompt + answer
                computed.update(block_hashes_int(history, bs))
                await asyncio.sleep(s.think_s[turn] / speedup)

        publisher = asyncio.create_task(publish_load())
        stalls = [0]
        watchdog = asyncio.create_task(watch_wakeups(engines, scale.watchdog_s, stalls))
        proc = psutil.Process()
        cpu0 = proc.cpu_times()
        t0 = loop.time()
        try:
            await asyncio.gather(*(run_session(i, t0) for i in range(len(workload.sessions))))
        finally:
            wall = loop.time() - t0
            cpu1 = proc.cpu_times()
            publisher.cancel()
            watchdog.cancel()
            stats = [engine.stats() for engine in engines]  # before shutdown: tiers close
            races = [0, 0, 0]
            for engine in engines:
                counts = LOAD_RACES.pop(id(getattr(engine, "tiers", None)), [0, 0, 0])
                races = [a + b for a, b in zip(races, counts, strict=True)]
            busy = [getattr(e, "simulated_time_ms", 0.0) / 1000 for e in engines]
            preemptions = sum(getattr(e, "num_preemptions", 0) for e in engines)
            down = time.monotonic()
            for engine in engines:
                await engine.shutdown()  # waits for the tiers' queued writes
            shutdown_s = time.monotonic() - down
        down = time.monotonic()
    cleanup_s = time.monotonic() - down  # the temporary folders' files removed
    r = ArmResult(scale.engine, arm.name, len(engines), arm.tier_aware, errors=errors)
    r.shutdown_s, r.cleanup_s = shutdown_s, cleanup_s
    r.stalls = stalls[0]
    r.loads, r.racing_loads, r.racing_blocks = races
    r.wall_s = wall
    r.cpu_share = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
    r.answers = answers
    r.preemptions = preemptions
    r.working_set_blocks = len(computed)
    r.device_blocks = (arm.device_blocks or scale.num_blocks) * len(engines)
    r.busy_gpu_s = sum(busy)
    summarize(r, records, stats, wall * speedup)
    return r


def summarize(r: ArmResult, records: list[RequestRecord], stats: list[Any], dur: float) -> None:
    r.requests = len(records)
    prompt = r.prompt_tokens = sum(x.prompt_tokens for x in records)
    r.cached_tokens = sum(x.cached_tokens for x in records)

    def share(n: float) -> float:
        return n / prompt if prompt else 0.0

    r.hit_rate = share(r.cached_tokens)
    r.reusable_rate = share(sum(x.reusable_tokens for x in records))
    r.ceiling_share = r.hit_rate / r.reusable_rate if r.reusable_rate else 0.0
    r.predicted_hit_rate = share(sum(x.predicted_tokens for x in records))
    r.lost_rate = share(sum(max(0, x.available_tokens - x.cached_tokens) for x in records))
    r.tier_share = {"GPU": share(sum(s.prefix_hit_tokens for s in stats))}
    for medium in MEDIUMS:
        tiers = [t for s in stats for t in s.kv_tiers if t.medium == medium]
        if not tiers:
            continue
        total: dict[str, float] = {}
        for t in tiers:
            for key, value in msgspec.structs.asdict(t).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        total["enabled_workers"] = sum(t.enabled for t in tiers)
        r.tiers[medium] = total
        r.tier_share[medium] = share(total.get("hit_tokens", 0))
    followups = [x for x in records if x.turn > 0]
    history = sum(max(0, x.reusable_tokens - x.system_tokens) for x in followups)
    on_device = sum(
        max(0, min(x.cached_tokens, x.reusable_tokens) - x.system_tokens) for x in followups
    )
    if history and not r.tiers:  # only meaningful without tiers: cached = device hits
        r.followup_device_evicted = 1 - on_device / history
    r.moved_share = sum(x.moved for x in followups) / len(followups) if followups else 0.0
    for moved in (False, True):
        group = [x for x in followups if x.moved == moved]
        ceiling = sum(x.reusable_tokens for x in group)
        value = sum(x.cached_tokens for x in group) / ceiling if ceiling else math.nan
        if moved:
            r.moved_ceiling_share = value
        else:
            r.stayed_ceiling_share = value
    ttfts = [x.ttft_ms for x in records if not math.isnan(x.ttft_ms)]
    r.ttfts_ms = ttfts
    r.ttft_p50_ms, r.ttft_p90_ms, r.ttft_p99_ms = (_percentile(ttfts, q) for q in (50, 90, 99))
    r.output_tokens = sum(x.output_tokens for x in records)
    r.duration_s = dur
    r.output_tok_per_s = r.output_tokens / dur if dur else 0.0
    r.busy_share = r.busy_gpu_s / (dur * r.workers) if dur and r.workers else 0.0


LOAD_RACES: dict[int, list[int]] = {}  # id(TierStack) -> [loads, at risk, blocks at risk]


def count_load_races() -> Callable[[], None]:
    """Count loads that start writing into device blocks whose copy out of the device is still
    due (``TierStack._stored`` / ``_evicted``, copied at the next ``begin_step``): if the load
    lands first, the tier below keeps the loaded bytes under the old block's hash. Observation
    only (the wrapped method runs unchanged); returns the undo. An upper bound: a disk or
    shared load may still land after the copy."""
    original = TierStack._load

    async def load(self: TierStack, plan: LoadPlan, block_ids: list[int], hits: bool) -> int:
        due = {e[0] for e in (*getattr(self, "_stored", ()), *getattr(self, "_evicted", ()))}
        hit = due.intersection(block_ids)
        counts = LOAD_RACES.setdefault(id(self), [0, 0, 0])
        counts[0] += 1
        counts[1] += bool(hit)
        counts[2] += len(hit)
        return await original(self, plan, block_ids, hits)

    setattr(TierStack, "_load", load)  # noqa: B010
    return lambda: setattr(TierStack, "_load", original)


async def watch_wakeups(engines: list[Engine], every_s: float, stalls: list[int]) -> None:
    """Wake a torch engine whose step loop sleeps with a request queued (counted in
    ``stalls``): works around a lost wakeup in ``TorchEngine._loop`` (engine.py), whose idle
    branch awaits the tiers' last copy out of the device (``_copy_out(idle=True)``) between
    seeing no work and ``self._wakeup.clear()``: a request arriving during that copy sets the
    event, which is then cleared, and the loop sleeps until another request or load wakes it
    (for ever if none comes). Queued requests with none running nor loading and the event
    clear can only be that state. ``--no-workarounds`` wakes it only after 1 s, so that the
    run ends while the stalls still show in the TTFTs. The mocker's idle copy does not await:
    it has no such stall."""
    while True:
        await asyncio.sleep(every_s)
        for engine in engines:
            wakeup = getattr(engine, "_wakeup", None)
            sched = getattr(engine, "_scheduler", None)
            if not isinstance(wakeup, asyncio.Event) or not isinstance(sched, Scheduler):
                continue
            if sched.waiting and not sched.running and not sched.remote and not wakeup.is_set():
                stalls[0] += 1
                wakeup.set()


# ---- the two engines -------------------------------------------------------------------------


def mocker_factory(scale: Scale) -> EngineFactory:
    def make(arm: Arm, root: Path) -> list[Engine]:
        return [
            MockerEngine(
                num_blocks=arm.device_blocks or scale.num_blocks,
                block_size=scale.block_size,
                context_length=scale.context,
                speedup=scale.speedup,
                seed=scale.seed,
                vocab_size=VOCAB,
                **MOCKER_TIMINGS.get(scale.timing, {}),
                **tier_knobs(arm, scale, root, w),
            )
            for w in range(arm.workers)
        ]

    return make


def mocker_ttft(engine: Engine, rid: str, wall_ms: float) -> float:
    assert isinstance(engine, MockerEngine)
    ttft = engine.simulated_ttft_ms(rid)
    return math.nan if ttft is None else ttft


def torch_factory(scale: Scale, model_dir: Path | None) -> EngineFactory:
    """Engines on the tiny model's folder, or (``model_dir`` None: the GPU scale) the
    Llama-3-8B shape with dummy bf16 weights on CUDA."""
    from dynamo_sdk.llm.torch_engine.engine import TorchEngine

    def make(arm: Arm, root: Path) -> list[Engine]:
        if model_dir is None:
            from engine_bench import LLAMA3_8B

            where: dict[str, Any] = dict(
                model_config=LLAMA3_8B,
                load_format="dummy",
                device="cuda",
                dtype="bfloat16",
                max_num_batched_tokens=8192,
                cuda_graph_sizes=[1, 2, 4, 8, 16, 32],
                kv_load_timeout_s=60.0,
            )
        else:
            where = dict(device="cpu")
        return [
            TorchEngine(
                None if model_dir is None else str(model_dir),
                num_blocks=arm.device_blocks or scale.num_blocks,
                block_size=scale.block_size,
                max_model_len=scale.context,
                **where,
                **tier_knobs(arm, scale, root, w),
            )
            for w in range(arm.workers)
        ]

    return make


def wall_ttft(engine: Engine, rid: str, wall_ms: float) -> float:
    return wall_ms


async def run_arms(
    scale: Scale,
    arms: list[Arm],
    workload: Workload,
    make_engines: EngineFactory,
    ttft_of: TtftOf,
    keep_answers: bool,
) -> list[ArmResult]:
    results = []
    for arm in arms:
        print(
            f"  ... {scale.engine} {arm.name}: {arm.workers} workers, "
            f"{len(workload.sessions)} sessions x {scale.turns} turns",
            file=sys.stderr,
        )
        results.append(await run_arm(arm, scale, workload, make_engines, ttft_of, keep_answers))
        gc.collect()
    return results


# ---- report ----------------------------------------------------------------------------------


@dataclass
class Results:
    settings: dict[str, Any] = field(default_factory=dict)
    mocker_scale: dict[str, Any] | None = None
    torch_scale: dict[str, Any] | None = None
    load_model: dict[str, float] = field(default_factory=dict)  # the mocker's load timing
    mocker: list[ArmResult] = field(default_factory=list)
    torch: list[ArmResult] = field(default_factory=list)
    torch_mismatches: dict[str, int] = field(default_factory=dict)  # arm -> answers differing
    torch_first_mismatch: dict[str, str] = field(default_factory=dict)
    checks: list[Target] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    runtime_s: dict[str, float] = field(default_factory=dict)


def compare_answers(results: Results) -> None:
    """Each tiered torch arm's answers against the device arm's, per (session, turn)."""
    by_arm = {r.arm: r for r in results.torch}
    base = by_arm.get(DEVICE)
    if base is None:
        return
    for r in results.torch:
        if r.arm == DEVICE:
            continue
        keys = sorted(set(base.answers) | set(r.answers))
        bad = [k for k in keys if base.answers.get(k) != r.answers.get(k)]
        results.torch_mismatches[r.arm] = len(bad)
        if bad:
            k = bad[0]
            want, got = base.answers.get(k, []), r.answers.get(k, [])
            at = next((i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), None)
            where = (
                f"token {at}: {want[at]} vs {got[at]}"
                if at is not None
                else f"{len(want)} vs {len(got)} tokens"
            )
            results.torch_first_mismatch[r.arm] = f"first: session-turn {k}, {where}"


def evaluate(results: Results) -> None:
    m = {r.arm: r for r in results.mocker}
    dev, hd, gpu = m.get(DEVICE), m.get(HOST_DISK), m.get(GPU_ROUTER)
    checks: list[Target] = []
    if dev is not None:
        ratio = dev.working_set_blocks / dev.device_blocks if dev.device_blocks else None
        checks.append(
            check(
                f"mocker KV working set >= {WORKING_SET_RATIO:g}x the device cache (all workers)",
                ratio,
                "x",
                lambda v: v >= WORKING_SET_RATIO,
                f"{dev.working_set_blocks:,} blocks / {dev.device_blocks:,}",
                digits=1,
            )
        )
        checks.append(
            check(
                "follow-ups' reusable history gone from the device before the next turn",
                None
                if math.isnan(dev.followup_device_evicted)
                else 100 * dev.followup_device_evicted,
                "%",
                lambda v: v >= 100 * EVICTED_SHARE,
                f"device arm; >= {EVICTED_SHARE:.0%} wanted",
            )
        )
    results.checks = checks

    def pct(v: float | None) -> float | None:
        return None if v is None else 100 * v

    targets = [
        check(
            f"mocker host+disk hit rate >= {TARGET_CEILING_SHARE:.0%} of the ceiling",
            pct(hd.ceiling_share) if hd else None,
            "%",
            lambda v: v >= 100 * TARGET_CEILING_SHARE,
            f"{hd.hit_rate:.1%} of {hd.reusable_rate:.1%}" if hd else "",
            digits=1,
        ),
        check(
            f"mocker device-only hit rate < {TARGET_DEVICE_MAX_SHARE:.0%} of the ceiling",
            pct(dev.ceiling_share) if dev else None,
            "%",
            lambda v: v < 100 * TARGET_DEVICE_MAX_SHARE,
            f"{dev.hit_rate:.1%} of {dev.reusable_rate:.1%}" if dev else "",
            digits=1,
        ),
        check(
            f"mocker TTFT p50 >= {TARGET_TTFT_RATIO:g}x lower with host+disk (device/host+disk)",
            dev.ttft_p50_ms / hd.ttft_p50_ms if dev and hd and hd.ttft_p50_ms > 0 else None,
            "x",
            lambda v: v >= TARGET_TTFT_RATIO,
            f"{dev.ttft_p50_ms:.0f} / {hd.ttft_p50_ms:.0f} simulated ms" if dev and hd else "",
        ),
        check(
            f"mocker GPU-only router >= {100 * TARGET_ROUTER_POINTS:.0f} points below "
            "tier-aware (host+disk)",
            pct(hd.hit_rate - gpu.hit_rate) if hd and gpu else None,
            "points",
            lambda v: v >= 100 * TARGET_ROUTER_POINTS,
            f"{hd.hit_rate:.1%} vs {gpu.hit_rate:.1%}" if hd and gpu else "",
            digits=1,
        ),
    ]
    torch_arms = {r.arm: r for r in results.torch}
    tdev = torch_arms.get(DEVICE)
    if tdev is not None and tdev.device_blocks:
        results.checks.append(
            check(
                f"torch KV working set >= {WORKING_SET_RATIO:g}x the device cache (all workers)",
                tdev.working_set_blocks / tdev.device_blocks,
                "x",
                lambda v: v >= WORKING_SET_RATIO,
                f"{tdev.working_set_blocks:,} blocks / {tdev.device_blocks:,}",
                digits=1,
            )
        )
    big = torch_arms.get(DEVICE_BIG)
    if big is not None and DEVICE in torch_arms:
        results.checks.append(
            check(
                f"torch device-arm answers == a {TORCH_BIG_DEVICE_BLOCKS}-block device's "
                "(mismatches)",
                float(results.torch_mismatches.get(DEVICE_BIG, 0)),
                f"of {big.requests}",
                lambda v: v == 0,
                "KV reused or recomputed gives the same greedy answers: the reference holds",
            )
        )
    tiered = [r for r in results.torch if r.arm not in (DEVICE, DEVICE_BIG)]
    # bf16 on a GPU: an answer depends on the batch it was computed in (the arms batch
    # differently; first turns with nothing cached already differ), so exactness is the fp32
    # CPU run's target; kv_tiers_gpu_bench checks the GPU copies bit for bit instead.
    exact = results.settings.get("torch_device", "cpu") == "cpu"
    if results.torch and tiered and exact:
        bad = sum(results.torch_mismatches.get(r.arm, 0) for r in tiered)
        total = sum(r.requests for r in tiered)
        targets.append(
            check(
                "torch greedy answers with tiers == without (mismatching answers)",
                float(bad),
                f"of {total}",
                lambda v: v == 0,
                "; ".join(
                    f"{r.arm}: {results.torch_first_mismatch[r.arm]}"
                    for r in tiered
                    if r.arm in results.torch_first_mismatch
                ),
            )
        )
    errors = sum(r.errors for r in (*results.mocker, *results.torch))
    targets.append(check("no request failed", float(errors), "errors", lambda v: v == 0))
    results.targets = targets


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0%}"


def _engine_table(arms: list[ArmResult], ttft_unit: str) -> list[str]:
    mediums = ["GPU", *(m for m in MEDIUMS if any(m in r.tier_share for r in arms))]
    header = (
        "arm",
        "workers",
        "reqs",
        "hit rate",
        *(f"{TIER_LABELS[m]} %" for m in mediums),
        "ceiling",
        "hit/ceil",
        "pred hit",
        "lost",
        "moved",
        "stay/moved hit/ceil",
        f"TTFT p50 {ttft_unit}",
        "p90",
        "p99",
        "out tok/s",
        "busy",
        "preempt",
        "errors",
        "run s",
        "stop s",
        "CPU",
    )
    rows = []
    for r in arms:
        rows.append(
            (
                r.arm,
                f"{r.workers}",
                f"{r.requests}",
                f"{r.hit_rate:.1%}",
                *(f"{100 * r.tier_share[m]:.1f}" if m in r.tier_share else "-" for m in mediums),
                f"{r.reusable_rate:.1%}",
                f"{r.ceiling_share:.1%}",
                f"{r.predicted_hit_rate:.1%}",
                f"{r.lost_rate:.1%}",
                f"{r.moved_share:.0%}",
                f"{_pct(r.stayed_ceiling_share)} / {_pct(r.moved_ceiling_share)}",
                f"{r.ttft_p50_ms:,.1f}",
                f"{r.ttft_p90_ms:,.1f}",
                f"{r.ttft_p99_ms:,.1f}",
                f"{r.output_tok_per_s:,.0f}",
                f"{r.busy_share:.0%}" if r.busy_gpu_s else "-",
                f"{r.preemptions}",
                f"{r.errors}",
                f"{r.wall_s:.1f}",
                f"{r.shutdown_s + r.cleanup_s:.1f}",
                f"{r.cpu_share:.0%}",
            )
        )
    return table(header, rows)


def io_over_sim(t: dict[str, float], medium: str, lm: dict[str, float], speedup: float) -> float:
    """A mocker tier's real load time (reads, their wait for the tier's I/O threads) over the
    simulated time of the same loads; NaN for the host (no real I/O) or no loads. Near or
    above 1, other requests waited in wall time for host I/O, which the simulated clock then
    counts as theirs: the simulated figures are skewed (lower ``--speedup``)."""
    if medium == "CPU" or not t.get("loads"):
        return math.nan
    key = "disk" if medium == "DISK" else "shared"
    sim_ms = (
        t["loads"] * lm[f"{key}_kv_latency_ms"] + t["onboard_blocks"] * lm[f"{key}_ms_per_block"]
    )
    return t.get("load_seconds", 0.0) * 1000 * speedup / sim_ms if sim_ms else math.nan


def _tier_table(arms: list[ArmResult], lm: dict[str, float], speedup: float | None) -> list[str]:
    header = (
        "arm",
        "tier",
        "hit tok",
        "loads",
        "onboard blk",
        "offload blk",
        "evicted blk",
        "corrupt",
        "errors",
        "declined",
        "load s (real)",
        *(("real/sim",) if speedup else ()),
    )
    rows = []
    for r in arms:
        for medium, t in r.tiers.items():
            if not t.get("enabled_workers") and not t.get("hit_tokens"):
                continue
            ratio = io_over_sim(t, medium, lm, speedup) if speedup else math.nan
            rows.append(
                (
                    r.arm,
                    TIER_LABELS[medium],
                    f"{t.get('hit_tokens', 0):,.0f}",
                    f"{t.get('loads', 0):,.0f}",
                    f"{t.get('onboard_blocks', 0):,.0f}",
                    f"{t.get('offload_blocks', 0):,.0f}",
                    f"{t.get('evicted_blocks', 0):,.0f}",
                    f"{t.get('corrupt_blocks', 0):,.0f}",
                    f"{t.get('errors', 0):,.0f}",
                    f"{t.get('declined_loads', 0):,.0f}",
                    f"{t.get('load_seconds', 0):.2f}",
                    *((("-" if math.isnan(ratio) else f"{ratio:.2f}"),) if speedup else ()),
                )
            )
    return table(header, rows, left=2) if rows else []


def _races_line(arms: list[ArmResult]) -> str:
    cells = ", ".join(
        f"{r.arm} {r.racing_loads}/{r.loads} ({r.racing_blocks} blocks)" for r in arms if r.loads
    )
    return f"loads started into blocks whose copy out of the device was still due: {cells or '-'}"


def _torch_where(results: Results) -> str:
    if results.settings.get("torch_device") == "cuda":
        return "CUDA, Llama-3-8B shape, dummy bf16 weights"
    return "CPU, tiny model"


def _scale_line(s: dict[str, Any]) -> str:
    return (
        f"{s['sessions']} sessions x {s['turns']} turns, {s['rate']:g} sessions/s, think "
        f"{s['think']:g} s (mean), system {s['system_prompts']} x {s['system_tokens']} tok, "
        f"first user {s['first_user_tokens']}, user {s['user_tokens']}, osl {s['osl']}, "
        f"max prompt {s['max_prompt']}; per worker: device {s['num_blocks']} blocks x "
        f"{s['block_size']} tok, host {s['host_blocks']}, disk {s['disk_blocks']} blocks"
    )


def format_report(results: Results) -> str:
    out: list[str] = []
    if results.settings.get("quick"):
        out.append("--quick: a smoke run at a scale and speedup whose figures mean nothing")
    if results.mocker and results.mocker_scale:
        s = results.mocker_scale
        dev = results.mocker[0]
        ratio = dev.working_set_blocks / dev.device_blocks if dev.device_blocks else math.nan
        lm = results.load_model
        workload = results.settings.get("workload", "?")
        out.append(f"mocker, workload {workload}: {_scale_line(s)}; speedup {s['speedup']:g}")
        out.append(
            f"  working set {dev.working_set_blocks:,} blocks = {ratio:.1f}x the device cache "
            f"({dev.device_blocks:,} blocks over {dev.workers} workers)"
        )
        out.append(
            f"  load-time model (--mocker-timing {s['timing']}): "
            f"{lm['kv_bytes_per_block'] / 2**20:g} MiB"
            f"/block; host {lm['host_kv_gbps']:g} GB/s + {lm['host_kv_latency_ms']:g} ms, disk "
            f"{lm['disk_kv_gbps']:g} GB/s + {lm['disk_kv_latency_ms']:g} ms, shared "
            f"{lm['shared_kv_gbps']:g} GB/s + {lm['shared_kv_latency_ms']:g} ms (+ the host copy)"
            f"; prefill {lm['prefill_ms_per_token']:g} ms/token = "
            f"{lm['prefill_ms_per_token'] * s['block_size']:.2f} ms/block vs a block's load: "
            f"host {lm['host_ms_per_block']:.3f}, disk {lm['disk_ms_per_block']:.3f}, shared "
            f"{lm['shared_ms_per_block']:.3f} ms"
        )
        out.append("")
        out += _engine_table(results.mocker, "sim ms")
        out.append("")
        out += _tier_table(results.mocker, lm, s["speedup"])
        out.append("  " + _races_line(results.mocker) + " (the mocker has no bytes to spoil)")
        for r in results.mocker:
            if r.cpu_share > CPU_WARN:
                out.append(
                    f"WARNING: mocker {r.arm} used {r.cpu_share:.0%} of a CPU: steps may have "
                    "been stretched; lower --speedup for trustworthy simulated figures"
                )
            for medium, t in r.tiers.items():
                ratio = io_over_sim(t, medium, lm, s["speedup"])
                if ratio > IO_WARN:
                    out.append(
                        f"WARNING: mocker {r.arm}: the {TIER_LABELS[medium]} loads' real I/O "
                        f"took {ratio:.0%} of their simulated time; requests queued behind "
                        "them waited in wall time, which the simulated clock counts; lower "
                        "--speedup"
                    )
        out.append("")
    if results.torch and results.torch_scale:
        s = results.torch_scale
        out.append(f"torch ({_torch_where(results)}, wall clock): {_scale_line(s)}")
        out.append("")
        out += _engine_table(results.torch, "wall ms")
        out.append("")
        out += _tier_table(results.torch, results.load_model, None)
        stalls = ", ".join(f"{r.arm} {r.stalls}" for r in results.torch)
        out.append(f"  lost wakeups (a torch engine asleep with a request queued): {stalls}")
        out.append("  " + _races_line(results.torch))
        for arm, n in results.torch_mismatches.items():
            detail = results.torch_first_mismatch.get(arm, "")
            out.append(f"  {arm}: {n} answers differ from the device arm's {detail}".rstrip())
        out.append("")
    out.append(
        "hit rate: cached prompt tokens / prompt tokens; GPU/host/disk/shared %: share of prompt "
        "tokens served from each tier; ceiling: reusable rate (one infinite cache); lost: held "
        "on device/host/disk by the chosen worker when routed, recomputed anyway; moved: "
        "follow-ups on another worker than the previous turn; busy: GPU busy share"
    )
    out.append("")
    if results.settings.get("workarounds"):
        out.append(
            "guard (a fixed library bug; --no-workarounds measures without): a torch engine "
            f"asleep with a request queued is woken within {WATCHDOG_S * 1000:.0f} ms "
            "(watch_wakeups)"
        )
    else:
        out.append(
            "no workaround (--no-workarounds): a torch engine asleep with a request queued is "
            f"woken after {WATCHDOG_AS_IS_S:g} s only, so that the run ends (watch_wakeups)"
        )
    out += format_targets(results.checks, "workload checks:")
    out += format_targets(results.targets)
    rt = results.runtime_s
    out.append("runtime: " + ", ".join(f"{k} {v:.0f} s" for k, v in rt.items() if v) if rt else "")
    return "\n".join(out)


def write_png(results: Results, path: Path) -> bool:
    """Per engine: hit rate stacked by tier (with the ceiling), TTFT p50/p99 per arm."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    engines = [(n, a) for n, a in (("mocker", results.mocker), ("torch", results.torch)) if a]
    if not engines:
        return False
    fig, axes = plt.subplots(len(engines), 2, figsize=(15, 5 * len(engines)), squeeze=False)
    for row, (name, arms) in enumerate(engines):
        xs = list(range(len(arms)))
        labels = [f"{r.arm.replace(' ', chr(10))}\n({r.workers} w)" for r in arms]
        ax = axes[row][0]
        bottom = [0.0] * len(arms)
        for medium in ("GPU", *MEDIUMS):
            ys = [100 * r.tier_share.get(medium, 0.0) for r in arms]
            if not any(ys):
                continue
            ax.bar(xs, ys, 0.6, bottom=bottom, label=TIER_LABELS[medium],
                   color=TIER_COLORS[medium])  # fmt: skip
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        ceiling = [100 * r.reusable_rate for r in arms]
        ax.scatter(xs, ceiling, marker="_", s=900, color="black", zorder=3,
                   label="ceiling (infinite cache)")  # fmt: skip
        for x, r, top in zip(xs, arms, bottom, strict=True):
            ax.annotate(f"{r.hit_rate:.0%}", (x, top), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")  # fmt: skip
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_ylabel("% of prompt tokens served from cache")
        ax.set_ylim(0, 125)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(f"{name}: hit rate by tier (label: total hit rate)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", ncol=5)
        ax = axes[row][1]
        unit = "simulated ms" if name == "mocker" else "wall ms"
        width = 0.38
        p50 = [r.ttft_p50_ms for r in arms]
        p99 = [r.ttft_p99_ms for r in arms]
        ax.bar([x - width / 2 for x in xs], p50, width, label="p50", color="#1f77b4")
        ax.bar([x + width / 2 for x in xs], p99, width, label="p99", color="#d62728")
        ax.set_xticks(xs, labels, fontsize=8)
        if all(v > 0 for v in (*p50, *p99) if math.isfinite(v)):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(f"TTFT, {unit} (log)")
        ax.set_title(f"{name}: TTFT per arm")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m, t = results.mocker_scale, results.torch_scale
    parts = []
    if m:
        parts.append(
            f"mocker ({results.settings.get('workload', '?')}): {m['sessions']} sessions x "
            f"{m['turns']} turns, {m['workers']} workers"
        )
    if t:
        parts.append(f"torch ({_torch_where(results)}): {t['sessions']} x {t['turns']}")
    fig.suptitle("KV tiers under multi-turn chat, kv router; " + "; ".join(parts))
    save(fig, path)
    return True


# ---- entry point -----------------------------------------------------------------------------


# the torch part's defaults: the CPU's tiny model, or (--torch-device cuda) the 8B shape
TORCH_DEFAULTS: dict[str, dict[str, float]] = {
    "cpu": {"torch_sessions": 20, "torch_workers": 2, "torch_rate": 4.0, "torch_think": 1.0,
            "torch_num_blocks": 40},
    "cuda": {"torch_sessions": 18, "torch_workers": 1, "torch_rate": 0.5, "torch_think": 2.0,
             "torch_num_blocks": 2048},
}  # fmt: skip
WORKLOADS: dict[str, dict[str, Any]] = {
    "context": {  # a long private context per session, then short questions
        "system_tokens": (100, 400),
        "first_user_tokens": (1500, 3000),
        "user_tokens": (50, 200),
        "max_prompt": 8192,
    },
    "chat": {  # router_bench.py's mix: long shared system prompts, longer turns
        "system_tokens": (500, 1500),
        "first_user_tokens": (300, 1000),
        "user_tokens": (100, 500),
        "max_prompt": 4096,
    },
}

QUICK = {
    "sessions": 16,
    "turns": 3,
    "rate": 20.0,
    "think": 2.0,
    "num_blocks": 320,
    "max_prompt": 4096,
    "speedup": 40.0,
    "torch_sessions": 4,
    "torch_turns": 2,
    "torch_workers": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", choices=("all", "mocker", "torch"), default="all")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("mocker workload and cluster")
    g.add_argument("--sessions", type=int, default=200)
    g.add_argument("--turns", type=int, default=6)
    g.add_argument("--workers", type=int, default=4)
    g.add_argument("--rate", type=float, default=10.0, help="sessions per simulated second")
    g.add_argument("--think", type=float, default=20.0, help="mean think time, simulated s")
    g.add_argument("--osl", type=_span, default=(64, 128), help="output tokens, N or LO-HI")
    g.add_argument("--workload", choices=tuple(WORKLOADS), default="context", help="prompt lengths")
    g.add_argument("--system-prompts", type=int, default=8)
    g.add_argument("--system-tokens", type=_span, default=None, help="LO-HI (preset's)")
    g.add_argument("--first-user-tokens", type=_span, default=None, help="LO-HI (preset's)")
    g.add_argument("--user-tokens", type=_span, default=None, help="LO-HI (preset's)")
    g.add_argument("--max-prompt", type=int, default=None, help="(preset's)")
    g.add_argument("--num-blocks", type=int, default=960, help="device KV blocks per worker")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--host-blocks", type=int, default=0, help="per worker; 0 = 4x --num-blocks")
    g.add_argument(
        "--disk-blocks", type=int, default=0, help="per worker; 0 = the whole workload's"
    )
    g.add_argument("--disk-admission", type=int, default=2, help="disk_kv_admission")
    g.add_argument("--adm1", action="store_true", help="add the host+disk adm1 arm")
    g.add_argument("--arms", default="", help="comma-separated arm names to run ('' = all)")
    g.add_argument("--shared-workers", type=int, default=0, help="0 = --workers")
    g.add_argument(
        "--shared-uri", default="", help="shared tier (must start empty); '' = a temp folder"
    )
    g.add_argument(
        "--mocker-storage",
        default="/dev/shm" if os.path.isdir("/dev/shm") else "",
        help="folder for the mocker's disk and shared folders ('' = the temp dir)",
    )
    g.add_argument(
        "--overlap-weight",
        type=float,
        default=2.0,
        help="RouterConfig.overlap_weight (configs/agg_router_tiers.yaml's)",
    )
    g.add_argument("--speedup", type=float, default=5.0, help="simulated s per wall s")
    g.add_argument(
        "--mocker-timing",
        choices=("default", *MOCKER_TIMINGS),
        default="default",
        help="the mocker's prefill and load times: MockerConfig's defaults, or h200 (fitted "
        "to kv_tiers_gpu_bench on one H200)",
    )
    g.add_argument("--metrics-interval", type=float, default=0.05, help="wall s")
    t = p.add_argument_group("torch engine (CPU, tiny model; wall clock)")
    t.add_argument("--torch-sessions", type=int, default=None, help="cpu 20, cuda 18")
    t.add_argument("--torch-turns", type=int, default=4)
    t.add_argument("--torch-workers", type=int, default=None, help="cpu 2, cuda 1")
    t.add_argument(
        "--torch-rate", type=float, default=None, help="sessions per second; cpu 4, cuda 0.5"
    )
    t.add_argument("--torch-think", type=float, default=None, help="mean think, s; cpu 1, cuda 2")
    t.add_argument(
        "--torch-num-blocks",
        type=int,
        default=None,
        help="device blocks a worker; cpu 40, cuda 2048",
    )
    t.add_argument(
        "--torch-device",
        default="cpu",
        help="cuda: the Llama-3-8B shape (dummy bf16 weights) and 8-24k-token histories "
        "(see torch_gpu_scale; --torch-* set its sessions, workers and device blocks)",
    )
    p.add_argument(
        "--no-workarounds",
        dest="workarounds",
        action="store_false",
        help="wake a stalled torch engine after 1 s, not 10 ms (see watch_wakeups)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument(
        "--png", type=Path, default=Path(__file__).with_name("kv_tiers_bench.png"), help="plot"
    )
    p.add_argument("--no-png", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()),
    )
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    for key, value in TORCH_DEFAULTS["cuda" if args.torch_device == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    positive = ("sessions", "turns", "workers", "num_blocks", "block_size", "torch_sessions",
                "torch_turns", "torch_workers", "torch_num_blocks", "disk_admission")  # fmt: skip
    if any(getattr(args, k) < 1 for k in positive):
        p.error(f"--{', --'.join(k.replace('_', '-') for k in positive)} must be >= 1")
    if min(args.rate, args.speedup, args.metrics_interval, args.torch_rate) <= 0:
        p.error("--rate, --torch-rate, --speedup and --metrics-interval must be > 0")
    if args.think < 0 or args.torch_think < 0:
        p.error("think times must be >= 0")
    context = args.max_prompt + args.osl[1] + args.block_size
    if context > args.num_blocks * args.block_size:
        p.error(f"--num-blocks {args.num_blocks} cannot hold one context of {context} tokens")
    host = args.host_blocks or 4 * args.num_blocks
    if host <= args.num_blocks:
        p.error("--host-blocks must exceed --num-blocks (write_through)")
    return args


def mocker_scale(args: argparse.Namespace) -> Scale:
    max_session = args.system_tokens[1] + args.max_prompt + args.turns * args.osl[1]
    whole = args.sessions * max_session // args.block_size + 1024  # every session's blocks
    return Scale(
        engine="mocker",
        sessions=args.sessions,
        turns=args.turns,
        workers=args.workers,
        rate=args.rate,
        think=args.think,
        osl=args.osl,
        system_prompts=args.system_prompts,
        system_tokens=args.system_tokens,
        first_user_tokens=args.first_user_tokens,
        user_tokens=args.user_tokens,
        max_prompt=args.max_prompt,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        host_blocks=args.host_blocks or 4 * args.num_blocks,
        disk_blocks=args.disk_blocks or whole,
        disk_admission=args.disk_admission,
        shared_workers=args.shared_workers or args.workers,
        shared_uri=args.shared_uri,
        storage_root=args.mocker_storage,
        overlap_weight=args.overlap_weight,
        speedup=args.speedup,
        metrics_interval=args.metrics_interval,
        watchdog_s=WATCHDOG_S if args.workarounds else WATCHDOG_AS_IS_S,
        seed=args.seed,
        timing=args.mocker_timing,
    )


def torch_scale(args: argparse.Namespace) -> Scale:
    """A few hundred tokens per prompt and a device cache of a few prompts."""
    blocks = args.torch_num_blocks
    bs = args.block_size
    max_prompt = blocks * bs - 16 - bs  # one context fits the device cache
    return replace(
        mocker_scale(args),
        engine="torch",
        sessions=args.torch_sessions,
        turns=args.torch_turns,
        workers=args.torch_workers,
        rate=args.torch_rate,
        think=args.torch_think,
        osl=(8, 16),
        system_prompts=4,
        system_tokens=(64, 160),
        first_user_tokens=(96, 192),
        user_tokens=(32, 96),
        max_prompt=max_prompt,
        num_blocks=blocks,
        host_blocks=4 * blocks,
        disk_blocks=args.torch_sessions * (max_prompt // bs + 4) + 256,
        disk_admission=1,  # every block to disk (see the docstring's host+disk adm1)
        shared_workers=args.torch_workers,
        storage_root="",  # a real disk: the torch engine's loads are timed on the wall clock
        speedup=1.0,
    )


def torch_gpu_scale(args: argparse.Namespace) -> Scale:
    """The GPU-measurements issue's run: Llama-3-8B-shaped KV (2 MiB a block), histories of
    8-24k tokens, a working set >= 8x the device cache; ``--torch-num-blocks`` (default
    2,048 here: 32k tokens, 4 GiB) per worker, a host tier 4x that (16 GiB pinned), a disk
    tier for the whole working set, the shared arm on 2 workers."""
    blocks = args.torch_num_blocks
    bs = args.block_size
    sessions = args.torch_sessions
    working = 4 * 4000 + sessions * (10000 + 3 * 3000 + 4 * 64)  # tokens, at most
    return replace(
        torch_scale(args),
        osl=(32, 64),
        system_prompts=4,
        system_tokens=(2000, 4000),
        first_user_tokens=(6000, 10000),
        user_tokens=(1500, 3000),
        max_prompt=blocks * bs - 64 - bs,
        num_blocks=blocks,
        host_blocks=4 * blocks,
        disk_blocks=working // bs + 256,
        shared_workers=2,
    )


def load_model_summary(timing: str = "default") -> dict[str, float]:
    cfg = MockerConfig(**MOCKER_TIMINGS.get(timing, {}))
    mb = cfg.kv_bytes_per_block / 1e6
    host = mb / cfg.host_kv_gbps
    return {
        "kv_bytes_per_block": cfg.kv_bytes_per_block,
        "host_kv_gbps": cfg.host_kv_gbps,
        "disk_kv_gbps": cfg.disk_kv_gbps,
        "shared_kv_gbps": cfg.shared_kv_gbps,
        "host_kv_latency_ms": cfg.host_kv_latency_ms,
        "disk_kv_latency_ms": cfg.disk_kv_latency_ms,
        "shared_kv_latency_ms": cfg.shared_kv_latency_ms,
        "prefill_ms_per_token": cfg.prefill_ms_per_token,
        "host_ms_per_block": host,
        "disk_ms_per_block": mb / cfg.disk_kv_gbps + host,
        "shared_ms_per_block": mb / cfg.shared_kv_gbps + host,
    }


def _plain(scale: Scale) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(scale).items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results()
    results.settings = {
        k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
    }
    results.settings.update(python=platform.python_version(), cpus=os.cpu_count())
    results.load_model = load_model_summary(args.mocker_timing)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    undo = count_load_races()
    try:
        run_parts(args, results)
    finally:
        undo()
        sys.setswitchinterval(switch)
    evaluate(results)
    print(format_report(results))
    if not args.no_png:
        if write_png(results, args.png):
            print(f"\nplot: {args.png}")
        else:
            print("\n(no plot: matplotlib is not installed)")
    if args.json is not None:
        data = asdict(results)
        for arm in (*data["mocker"], *data["torch"]):
            arm.pop("answers", None)  # compared above; thousands of token lists
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(data), indent=2) + "\n")
    return 0


def run_parts(args: argparse.Namespace, results: Results) -> None:
    started = time.monotonic()
    if args.part in ("all", "mocker"):
        scale = mocker_scale(args)
        results.mocker_scale = _plain(scale)
        workload = workload_for(scale, VOCAB)
        arms = mocker_arms(scale, adm1=args.adm1)
        if args.arms:
            arms = [a for a in arms if a.name in args.arms.split(",")]
        t0 = time.monotonic()
        results.mocker = uvloop.run(
            run_arms(scale, arms, workload, mocker_factory(scale), mocker_ttft, False)
        )
        results.runtime_s["mocker"] = time.monotonic() - t0
    if args.part in ("all", "torch"):
        from dynamo_sdk.llm.testing.tiny_model import build_tiny_model
        from dynamo_sdk.llm.torch_engine.config import ModelConfig

        t0 = time.monotonic()
        gpu = args.torch_device == "cuda"
        model_dir = None if gpu else build_tiny_model()
        scale = torch_gpu_scale(args) if gpu else torch_scale(args)
        results.torch_scale = _plain(scale)
        vocab = VOCAB if model_dir is None else ModelConfig.from_folder(str(model_dir)).vocab_size
        workload = workload_for(scale, vocab)
        arms = torch_arms(scale, gpu)
        if args.arms:
            arms = [a for a in arms if a.name in args.arms.split(",")]
        results.torch = uvloop.run(
            run_arms(
                scale,
                arms,
                workload,
                torch_factory(scale, model_dir),
                wall_ttft,
                True,
            )
        )
        compare_answers(results)
        results.runtime_s["torch"] = time.monotonic() - t0
    results.runtime_s["total"] = time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())
