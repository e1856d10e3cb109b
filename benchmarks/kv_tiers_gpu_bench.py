"""The KV tiers of the torch engine on one GPU: copies, warm TTFT per tier, offload cost.

Model: Llama-3-8B-shaped (``engine_bench.LLAMA3_8B``), dummy bf16 weights, 16-token blocks
(2 MiB of KV each). Everything in one process; the numbers the GPU-measurements issue asks
for, each against its anchor measured in the same run:

1. ``copy``: pinned host -> device and device -> host bandwidth (one 2 GiB copy, CUDA
   events, median of 10): the ceiling of onboarding.
2. ``pool``: the host pool's own copies (``HostKvPool``), the path every host hit takes:
   N blocks from scattered host slots into scattered cache blocks (16 .. 2,048), timed from
   the call to the end of its wait; GB/s and the share of (1). Both directions are checked
   bit-exact on random data first.
3. ``ttft``: for each context (8k, 16k, 32k tokens): the prompt's TTFT computed from nothing
   (``recompute``), then, after the device cache was emptied, loaded back from the host tier,
   from the local disk (host tier emptied too), and by a second engine from the shared folder
   the first one wrote (``shared``; that engine's own tiers empty). Each a fresh suffix of 16
   tokens past the stored blocks, one output token, median of ``--repeats``.
4. ``itl``: running streams' inter-token latency while new prompts arrive and are prefilled,
   with the host tier (write-through: every computed block copied out) and without, the same
   seeded workload, alternated ``--itl-repeats`` times; the p99 ratio.
5. ``re-offloads``: stored events for the host tier of a block it already held (read off the
   engine's KV events, independently of the stack's own bookkeeping): must be 0.

Usage (on the GPU machine)::

    python benchmarks/kv_tiers_gpu_bench.py --json OUT.json

Locally, ``--device cpu --small`` runs it all on a 2-layer model to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import json_safe
from benchmarks.engine_bench import LLAMA3_8B, SMALL, greedy_request
from dynamo_sdk.llm.kv.events import BlockRemoved, BlockStored, KvEvent
from dynamo_sdk.llm.kv.tiers.stack import DISK, HOST, SHARED, TierStack
from dynamo_sdk.llm.torch_engine.config import ModelConfig
from dynamo_sdk.llm.torch_engine.engine import TorchEngine
from dynamo_sdk.llm.torch_engine.host_kv import HostKvPool


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- 1. the copy ceiling ---------------------------------------------------------------------


def copy_ceiling(device: torch.device, nbytes: int) -> dict[str, float]:
    """GB/s of one pinned host <-> device copy of ``nbytes`` (random bytes)."""
    if device.type != "cuda":
        return {}
    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out: dict[str, float] = {}
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        out[f"{name}_gbps"] = nbytes / median(times) / 1e9
    del dev, host
    return out


# -- the engine ------------------------------------------------------------------------------


class EventLog:
    """The engine's KV events, checked for re-offloads: a host store of a block held already."""

    def __init__(self) -> None:
        self.in_host: set[int] = set()
        self.host_stores = 0
        self.re_offloads = 0

    def __call__(self, events: list[KvEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored) and ev.medium == HOST:
                for h in ev.block_hashes:
                    self.host_stores += 1
                    if h in self.in_host:
                        self.re_offloads += 1
                    self.in_host.add(h)
            elif isinstance(ev, BlockRemoved) and ev.medium == HOST:
                self.in_host.difference_update(ev.block_hashes)


LOADS: list[tuple[float, float]] = []  # (start, end) of each TierStack.load since cleared


def time_loads() -> Callable[[], None]:
    """Record every tier load's span in `LOADS` (a request's TTFT = before + load + after);
    returns the undo."""
    load = TierStack.load

    async def timed(self: TierStack, plan: Any, block_ids: list[int], **kw: Any) -> int:
        t0 = time.perf_counter()
        try:
            return await load(self, plan, block_ids, **kw)
        finally:
            LOADS.append((t0, time.perf_counter()))

    TierStack.load = timed  # type: ignore[method-assign]

    def undo() -> None:
        TierStack.load = load  # type: ignore[method-assign]

    return undo


def make_engine(args: argparse.Namespace, cfg: ModelConfig, **tiers: Any) -> TorchEngine:
    return TorchEngine(
        None,
        model_config=cfg,
        load_format="dummy",
        device=args.device,
        dtype=args.dtype,
        num_blocks=args.num_blocks,
        block_size=16,
        max_model_len=max(args.contexts) + 64,
        max_num_seqs=64,
        max_num_batched_tokens=args.max_batched_tokens,
        cuda_graph_sizes=[1, 2, 4, 8, 16, 32, 64],
        **tiers,
    )


async def generate(engine: TorchEngine, prompt: list[int], new: int, rid: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    cached = 0
    async for out in engine.generate(greedy_request(prompt, new, rid)):
        stamps += [time.perf_counter()] * len(out.token_ids)
        if out.cached_tokens is not None:
            cached = out.cached_tokens
    return {"ttft_s": stamps[0] - t0, "t0": t0, "stamps": stamps, "cached": cached}


def split(out: dict[str, Any]) -> tuple[float, float, float]:
    """(before the load, the load, after it) of one request's TTFT, from `LOADS`."""
    if not LOADS:
        return 0.0, 0.0, 0.0
    start, end = LOADS[0][0], LOADS[-1][1]
    return start - out["t0"], sum(b - a for a, b in LOADS), out["stamps"][0] - end


def stack_of(engine: TorchEngine) -> TierStack:
    assert engine.tiers is not None
    return engine.tiers


# -- 2. the pool's copies --------------------------------------------------------------------


def same(pool: HostKvPool, blocks: list[int], slots: list[int]) -> bool:
    """Every cache block equals its host slot, bit for bit."""
    kv = pool.kv
    return all(
        torch.equal(pool.pool[s].to(kv.device), kv[:, :, b])
        for b, s in zip(blocks, slots, strict=True)
    )


def pool_copies(engine: TorchEngine, counts: list[int], ceiling: dict[str, float]) -> list[dict]:
    """Bit-exact checks, then timed loads of ``counts`` blocks (random slots and blocks)."""
    pool = stack_of(engine).io
    assert isinstance(pool, HostKvPool)
    kv = pool.kv
    rng = random.Random(1)
    usable = kv.shape[2] - 1  # the last block is the runner's scratch
    n = min(64, usable, pool.pool.shape[0])
    blocks = rng.sample(range(usable), n)
    slots = rng.sample(range(pool.pool.shape[0]), n)
    # device -> host: random KV in the blocks, copied out, compared slot by slot
    kv[:, :, blocks] = torch.randn_like(kv[:, :, blocks])
    pool.device_to_host(blocks, slots)
    pool.read_slot(slots[0])  # waits for the copies
    d2h_ok = same(pool, blocks, slots)
    # host -> device: random bytes in the slots, copied in, compared
    pool.pool[slots] = torch.randn_like(pool.pool[slots])
    targets = rng.sample(range(usable), n)
    wait = pool.host_to_device(slots, targets)
    if wait is not None:
        wait()
    h2d_ok = same(pool, targets, slots)
    rows = [{"check": "bit-exact", "d2h": d2h_ok, "h2d": h2d_ok}]
    for count in counts:
        count = min(count, usable, pool.pool.shape[0])
        times = []
        for r in range(5):
            s = rng.sample(range(pool.pool.shape[0]), count)
            if r % 2:  # also the contiguous case: a prompt's blocks offloaded together
                first = rng.randrange(pool.pool.shape[0] - count + 1)
                s = list(range(first, first + count))
            b = rng.sample(range(usable), count)
            t0 = time.perf_counter()
            wait = pool.host_to_device(s, b)
            if wait is not None:
                wait()
            times.append(time.perf_counter() - t0)
        gbps = count * pool.block_nbytes / median(times) / 1e9
        h2d = ceiling.get("h2d_gbps")
        rows.append(
            {
                "blocks": count,
                "ms": median(times) * 1e3,
                "gbps": gbps,
                "of_h2d": gbps / h2d if h2d else None,
            }
        )
    return rows


# -- 3. warm TTFT per tier -------------------------------------------------------------------


async def ttft_per_tier(
    args: argparse.Namespace, cfg: ModelConfig, root: Path, log: EventLog, out: dict[str, Any]
) -> list[dict]:
    """Also runs `pool_copies` on the first engine once it is warm (into ``out``)."""
    shared = f"file://{root / 'shared'}"
    first = make_engine(
        args,
        cfg,
        on_events=log,
        host_kv_blocks=args.host_blocks,
        disk_kv_blocks=args.disk_blocks,
        disk_kv_path=str(root / "disk"),
        disk_kv_admission=1,
        shared_kv=shared,
        kv_load_timeout_s=60.0,
    )
    await first.start()
    second = make_engine(args, cfg, host_kv_blocks=args.host_blocks, shared_kv=shared,
                         kv_load_timeout_s=60.0)  # fmt: skip
    await second.start()
    rng = random.Random(0)
    vocab = cfg.vocab_size
    rows = []
    try:
        for eng in (first, second):  # compile and capture at every length first
            for ctx in args.contexts:
                warm = [rng.randrange(vocab) for _ in range(ctx)]
                await generate(eng, warm, 1, "warm")
                # and the timed rows' own shape: a 16-token chunk over a long cached context
                # (the split-key attention launch; compiled on first use, it once cost the
                # first host row at 8k ~0.9 s in one of its two repeats)
                suffix = [rng.randrange(vocab) for _ in range(16)]
                await generate(eng, warm[:-16] + suffix, 1, "warm-suffix")
            eng.reset_prefix_cache()
            stack_of(eng).clear_host()
        out["block_bytes"] = stack_of(first).io.block_nbytes
        out["pool"] = pool_copies(first, args.pool_blocks, out["copy"])
        print("pool copies done", flush=True)
        for ctx in args.contexts:
            stored = ctx - 16
            found: dict[str, list[float]] = {k: [] for k in ("recompute", HOST, DISK, SHARED)}
            cached: dict[str, list[int]] = {k: [] for k in found}
            loads: dict[str, list[tuple[float, float, float]]] = {k: [] for k in found}
            for r in range(args.repeats):
                base = [rng.randrange(vocab) for _ in range(stored)]

                def fresh(base: list[int] = base) -> list[int]:
                    return base + [rng.randrange(vocab) for _ in range(16)]

                out = await generate(first, fresh(), 1, f"c{ctx}-{r}")
                found["recompute"].append(out["ttft_s"])
                cached["recompute"].append(out["cached"])
                await asyncio.sleep(0.05)  # the engine's idle copy-out of the last blocks
                await stack_of(first).drain_writes()
                for medium in (HOST, DISK):
                    first.reset_prefix_cache()
                    if medium == DISK:
                        stack_of(first).clear_host()
                    LOADS.clear()
                    out = await generate(first, fresh(), 1, f"{medium}{ctx}-{r}")
                    found[medium].append(out["ttft_s"])
                    cached[medium].append(out["cached"])
                    loads[medium].append(split(out))
                LOADS.clear()
                out = await generate(second, fresh(), 1, f"s{ctx}-{r}")
                found[SHARED].append(out["ttft_s"])
                cached[SHARED].append(out["cached"])
                loads[SHARED].append(split(out))
                for eng in (first, second):  # the next repeat starts from empty caches
                    eng.reset_prefix_cache()
                    stack_of(eng).clear_host()
            recompute = median(found["recompute"])
            for name, times in found.items():
                rows.append(
                    {
                        "context": ctx,
                        "source": name,
                        "ttft_ms": median(times) * 1e3,
                        "ttft_ms_range": [min(times) * 1e3, max(times) * 1e3],
                        "speedup": recompute / median(times),
                        "cached_tokens": min(cached[name]),
                        "before_load_ms": median([x[0] for x in loads[name]]) * 1e3,
                        "load_ms": median([x[1] for x in loads[name]]) * 1e3,
                        "after_load_ms": median([x[2] for x in loads[name]]) * 1e3,
                    }
                )
        rows.append({"tier_stats": [_stats(first), _stats(second)]})
    finally:
        await first.shutdown()
        await second.shutdown()
    return rows


def _stats(engine: TorchEngine) -> dict[str, Any]:
    return {
        s.medium: {
            "hit_tokens": s.hit_tokens,
            "onboard_blocks": s.onboard_blocks,
            "offload_blocks": s.offload_blocks,
            "load_s": round(s.load_seconds, 4),
            "corrupt": s.corrupt_blocks,
            "errors": s.errors,
            "skipped": s.skipped_blocks,
        }
        for s in stack_of(engine).snapshot()
    }


# -- 4. offload's cost to running streams ----------------------------------------------------


async def itl_under_offload(
    args: argparse.Namespace, cfg: ModelConfig, host: bool, log: EventLog | None
) -> dict[str, float]:
    tiers: dict[str, Any] = {"host_kv_blocks": args.host_blocks} if host else {}
    engine = make_engine(args, cfg, on_events=log, **tiers)
    await engine.start()
    rng = random.Random(7)
    vocab = cfg.vocab_size
    try:
        await generate(engine, [rng.randrange(vocab) for _ in range(512)], 4, "warm")
        n, gap = args.itl_streams, args.itl_gap_s
        prompts = [[rng.randrange(vocab) for _ in range(args.itl_prompt)] for _ in range(n)]

        async def one(i: int) -> dict[str, Any]:
            await asyncio.sleep(i * gap)
            return await generate(engine, prompts[i], args.itl_new, f"itl{i}")

        outs = await asyncio.gather(*(one(i) for i in range(n)))
        gaps = [b - a for o in outs for a, b in zip(o["stamps"], o["stamps"][1:], strict=False)]
        return {"itl_p50_ms": pct(gaps, 0.5) * 1e3, "itl_p99_ms": pct(gaps, 0.99) * 1e3}
    finally:
        await engine.shutdown()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SMALL if args.small else LLAMA3_8B
    device = torch.device(args.device)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda"
                           else "cpu", "args": {k: v for k, v in vars(args).items()
                                                if k != "json"}}  # fmt: skip
    t0 = time.perf_counter()
    out["copy"] = copy_ceiling(device, 2 << 30)
    log = EventLog()
    with tempfile.TemporaryDirectory(dir=args.storage) as tmp:
        root = Path(tmp)
        out["ttft"] = await ttft_per_tier(args, cfg, root, log, out)
        print(f"ttft done at {time.perf_counter() - t0:.0f} s", flush=True)
    itl: dict[str, list[dict[str, float]]] = {"off": [], "host": []}
    logs = [log]
    if args.itl_repeats:
        await itl_under_offload(args, cfg, False, None)  # a warm-up, not counted
    for _ in range(args.itl_repeats):
        itl["off"].append(await itl_under_offload(args, cfg, False, None))
        logs.append(EventLog())  # each engine its own: their prompts repeat
        itl["host"].append(await itl_under_offload(args, cfg, True, logs[-1]))
    out["itl"] = itl
    out["re_offloads"] = sum(x.re_offloads for x in logs)
    out["host_stores"] = sum(x.host_stores for x in logs)
    out["wall_s"] = time.perf_counter() - t0
    return out


def report(out: dict[str, Any]) -> None:
    print(f"\n== KV tiers on {out['device']} (block {out['block_bytes'] / 2**20:.1f} MiB)")
    c = out["copy"]
    if c:
        print(f"pinned copy, 2 GiB: host->device {c['h2d_gbps']:.1f} GB/s, "
              f"device->host {c['d2h_gbps']:.1f} GB/s")  # fmt: skip
    check = out["pool"][0]
    print(f"host pool copies bit-exact: device->host {check['d2h']}, host->device {check['h2d']}")
    print(f"{'blocks':>7} {'ms':>8} {'GB/s':>7} {'of pinned h2d':>14}")
    for row in out["pool"][1:]:
        share = f"{row['of_h2d']:.0%}" if row["of_h2d"] else "-"
        print(f"{row['blocks']:>7} {row['ms']:>8.2f} {row['gbps']:>7.1f} {share:>14}")
    print(f"\n{'context':>8} {'from':>10} {'TTFT ms':>9} {'range':>17} {'x recompute':>12} "
          f"{'cached':>7} {'before':>7} {'load':>7} {'after':>7}")  # fmt: skip
    for row in out["ttft"]:
        if "context" not in row:
            continue
        lo, hi = row["ttft_ms_range"]
        parts = (row["before_load_ms"], row["load_ms"], row["after_load_ms"])
        split_ms = " ".join("      -" if math.isnan(x) else f"{x:>7.1f}" for x in parts)
        print(
            f"{row['context']:>8} {row['source']:>10} {row['ttft_ms']:>9.1f} "
            f"{lo:>8.1f}-{hi:<8.1f} {row['speedup']:>12.1f} {row['cached_tokens']:>7} {split_ms}"
        )
    if not out["itl"]["off"]:
        print(f"\n(ITL not measured) wall {out['wall_s']:.0f} s")
        return
    off = [r["itl_p99_ms"] for r in out["itl"]["off"]]
    on = [r["itl_p99_ms"] for r in out["itl"]["host"]]
    print(
        f"\nITL p99 of running streams: tiers off {', '.join(f'{x:.2f}' for x in off)} ms; "
        f"host write-through {', '.join(f'{x:.2f}' for x in on)} ms; "
        f"ratio of medians {median(on) / median(off):.3f}"
    )
    print(f"host-tier stores {out['host_stores']}, of blocks already held: {out['re_offloads']}")
    print(f"wall {out['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--small", action="store_true", help="a 2-layer model (script check)")
    p.add_argument("--num-blocks", type=int, default=4096, help="device KV blocks")
    p.add_argument("--host-blocks", type=int, default=8192)
    p.add_argument("--disk-blocks", type=int, default=12288)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pool-blocks", type=int, nargs="+", default=[16, 128, 512, 2048])
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--itl-streams", type=int, default=48)
    p.add_argument("--itl-prompt", type=int, default=1024)
    p.add_argument("--itl-new", type=int, default=128)
    p.add_argument("--itl-gap-s", type=float, default=0.05)
    p.add_argument("--itl-repeats", type=int, default=3)
    p.add_argument("--storage", default=None, help="where the disk and shared folders go")
    p.add_argument("--json")
    args = p.parse_args(argv)
    undo = time_loads()
    try:
        out = asyncio.run(run(args))
    finally:
        undo()
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(out), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
