"""Aggregated vs disaggregated serving of long prompts: TTFT, ITL and throughput.

Two engine processes either way, on the same GPUs (one each when two are visible, both on
the one GPU otherwise), each a ``TorchEngine`` on a Llama-3-8B-shaped model with dummy bf16
weights:

* ``agg``: two workers; requests alternate between them; each prefills and decodes its own
  (chunked prefill mixed into decode steps, as vLLM does).
* ``disagg``: one prefill worker and one decode worker. The decode worker allocates a
  prompt's blocks and asks the prefill worker, which computes the KV and writes it into those
  blocks (``send_kv``: CUDA IPC between processes on one machine); the decode worker then
  computes the last prompt token and decodes. This is the engine-level path of
  ``graphs/disagg.py`` without NATS/etcd in between (the queue is a pipe here), so the
  comparison is about where prefill runs, not about the control plane.

Workload (seeded): ``--requests`` prompts of uniform ``--prompt`` tokens, ``--new`` output
tokens each (EOS ignored), Poisson arrivals at ``--rate`` per second; the same for both modes.
Per mode: TTFT p50/p99, ITL p50/p99 (every gap between consecutive tokens of a request, as
the client sees them), output tokens/s and per GPU, and for disagg the KV transfer volume and
time. Saves a PNG of the ITL and TTFT distributions with ``--png``.

Usage (GPU machine): ``python benchmarks/disagg_bench.py [--rate 1.5] [--png out.png]``;
``--small --device cpu`` checks the script on a CPU with a 2-layer model.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import multiprocessing.connection
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_pinning import start_pinned


def engine_for(args: argparse.Namespace, device: str) -> Any:
    from engine_bench import LLAMA3_8B, SMALL  # noqa: I001 (a sibling script)
    from dynamo_sdk.llm.torch_engine.engine import TorchEngine

    return TorchEngine(
        None,
        model_config=SMALL if args.small else LLAMA3_8B,
        load_format="dummy",
        device=device,
        dtype="float32" if args.small else "bfloat16",
        num_blocks=args.num_blocks,
        max_model_len=args.prompt[1] + args.new + 64,
        max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=128,
    )


def request(rid: str, tokens: list[int], new: int) -> Any:
    from dynamo_sdk.llm.protocol import PreprocessedRequest, SamplingOptions, StopConditions

    return PreprocessedRequest(
        request_id=rid,
        model="bench",
        token_ids=tokens,
        stop=StopConditions(max_tokens=new, ignore_eos=True),
        sampling=SamplingOptions(temperature=0.0),
    )


class Pipe:
    """A multiprocessing connection read from an asyncio loop."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(conn.fileno(), self._ready)

    def _ready(self) -> None:
        while self.conn.poll():
            self.queue.put_nowait(self.conn.recv())

    def send(self, item: Any) -> None:
        self.conn.send(item)


def serve_main(role: str, device: str, args: argparse.Namespace, front: Any, peer: Any) -> None:
    """One engine process: ``agg`` / ``decode`` answer the driver; ``prefill`` the decoder."""
    asyncio.run(_serve(role, device, args, front, peer))


async def _serve(role: str, device: str, args: argparse.Namespace, front: Any, peer: Any) -> None:
    from dynamo_sdk.llm.disagg.protocol import TransferHeader
    from dynamo_sdk.llm.disagg.transfer import KvReceiver, send_kv
    from dynamo_sdk.llm.engines.base import GenerateOptions

    engine = engine_for(args, device)
    await engine.start()
    layout = engine.kv_layout()
    out = Pipe(front)
    peer_pipe = Pipe(peer) if peer is not None else None
    receiver = None
    if role == "decode":
        receiver = KvReceiver(layout, engine.write_kv, cache=engine.kv_cache_tensor())
        assert peer_pipe is not None
        peer_pipe.send(("endpoint", await receiver.start()))
    endpoint = None
    if role == "prefill":
        assert peer_pipe is not None
        _, endpoint = await peer_pipe.queue.get()
    out.send(("ready", role))
    moved = {"bytes": 0, "seconds": 0.0, "transfers": 0}

    async def generate(rid: str, tokens: list[int], new: int) -> None:
        remote = None
        if role == "decode":
            assert receiver is not None and peer_pipe is not None

            async def remote(slots: Any) -> int:
                receiver.expect(rid, slots.block_ids)
                first = slots.num_cached_tokens // slots.block_size
                peer_pipe.send(("prefill", rid, tokens, slots.block_ids, first))
                return await receiver.wait(rid, 120)

        async for o in engine.generate(
            request(rid, tokens, new), GenerateOptions(remote_prefill=remote)
        ):
            out.send(("tok", rid, len(o.token_ids), time.time(), o.finish_reason is not None))

    async def prefill(rid: str, tokens: list[int], block_ids: list[int], first: int) -> None:
        covered, kv = await engine.prefill_and_export(request(rid, tokens, 1), first)
        ids = block_ids[first : -(-covered // layout.block_size)]
        t0 = time.perf_counter()
        await send_kv(endpoint, TransferHeader(rid, ids, layout, num_tokens=covered), kv)
        moved["seconds"] += time.perf_counter() - t0
        moved["bytes"] += kv.numel() * kv.element_size()
        moved["transfers"] += 1

    tasks: set[asyncio.Task[None]] = set()
    source = peer_pipe if role == "prefill" else out
    assert source is not None
    while True:
        msg = await source.queue.get()
        if msg[0] == "stop":
            break
        if msg[0] == "gen":
            task = asyncio.create_task(generate(*msg[1:]))
        elif msg[0] == "prefill":
            task = asyncio.create_task(prefill(*msg[1:]))
        else:
            continue
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if role == "decode":
        assert peer_pipe is not None
        peer_pipe.send(("stop",))
    out.send(("stats", role, moved, engine.stats().max_batch_running))
    await engine.shutdown()


def run_mode(mode: str, args: argparse.Namespace, work: list[tuple[float, list[int]]]) -> dict:
    import torch

    ctx = mp.get_context("spawn")
    two = torch.cuda.device_count() > 1 and not args.device.startswith("cpu")
    roles = ["agg", "agg"] if mode == "agg" else ["prefill", "decode"]
    fronts, procs = [], []
    peer_a, peer_b = ctx.Pipe() if mode == "disagg" else (None, None)
    for gpu, role in enumerate(roles):
        mine, theirs = ctx.Pipe()
        peer = peer_a if role == "prefill" else peer_b
        # two GPUs: pinned as `dynamo serve` pins them (each its own GPU as cuda:0; the
        # prefill worker also sees the decode worker's, for CUDA IPC); one: both share it
        device = "cuda:0" if two else args.device
        proc = ctx.Process(target=serve_main, args=(role, device, args, theirs, peer))
        if two:
            start_pinned(proc, [gpu], [1 - gpu] if role == "prefill" else [])
        else:
            proc.start()
        fronts.append(mine)
        procs.append(proc)
    devices = ["cuda:0", "cuda:1"] if two else [args.device]
    for conn in fronts:
        assert conn.recv()[0] == "ready"
    targets = fronts if mode == "agg" else [fronts[1]]  # the decode worker takes requests
    events: dict[str, list[tuple[int, float]]] = {}
    arrivals: dict[str, float] = {}
    start = time.time()
    sent = done = 0
    while done < len(work):  # send on schedule while reading tokens (pipes must not fill)
        wait = work[sent][0] - (time.time() - start) if sent < len(work) else 1.0
        for conn in multiprocessing.connection.wait(targets, timeout=max(wait, 0)):
            _, rid, n, t, finished = conn.recv()
            events.setdefault(rid, []).append((n, t))
            done += finished
        if sent < len(work) and time.time() - start >= work[sent][0]:
            rid = f"{mode}-{sent}"
            arrivals[rid] = time.time()
            targets[sent % len(targets)].send(("gen", rid, work[sent][1], args.new))
            sent += 1
    stats = []
    for conn in fronts:
        if conn in targets:
            conn.send(("stop",))
    for conn in fronts:
        while True:
            msg = conn.recv()
            if msg[0] == "stats":
                stats.append(msg[1:])
                break
    for proc in procs:
        proc.join(60)
    return summarize(mode, arrivals, events, len(set(devices)), stats)


def summarize(mode: str, arrivals: dict[str, float], events: dict, gpus: int, stats: list) -> dict:
    ttft, itl, total, last = [], [], 0, 0.0
    for rid, evs in events.items():
        ttft.append(evs[0][1] - arrivals[rid])
        for (_, a), (n, b) in itertools.pairwise(evs):
            itl.extend([(b - a) / n] * n)  # a merged delta spreads its gap over its tokens
        total += sum(n for n, _ in evs)
        last = max(last, evs[-1][1])
    wall = last - min(arrivals.values())

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    out = {
        "mode": mode,
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "itl_p50_ms": pct(itl, 0.5),
        "itl_p99_ms": pct(itl, 0.99),
        "out_tok_s": total / wall,
        "out_tok_s_per_gpu": total / wall / gpus,
        "gpus": gpus,
        "ttft_ms": sorted(x * 1000 for x in ttft),
        "itl_ms": sorted(x * 1000 for x in itl),
    }
    for role, moved, max_batch in stats:
        if moved["transfers"]:
            out["kv_transfers"] = moved["transfers"]
            out["kv_gb"] = moved["bytes"] / 1e9
            out["kv_gb_s"] = moved["bytes"] / 1e9 / max(moved["seconds"], 1e-9)
        out[f"max_batch_{role}"] = max(out.get(f"max_batch_{role}", 0), max_batch)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt", type=int, nargs=2, help="prompt length range (2048 8192)")
    p.add_argument("--new", type=int, help="output tokens per request (256)")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    p.add_argument("--num-blocks", type=int, default=6000)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--small", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["agg", "disagg"])
    p.add_argument("--json")
    p.add_argument("--png")
    args = p.parse_args()
    # --small's model has a 4,096-position rotary table: its default prompts must fit it.
    args.prompt = args.prompt or ((256, 1024) if args.small else (2048, 8192))
    args.new = args.new or (32 if args.small else 256)
    rng = random.Random(args.seed)
    vocab = 4096 if args.small else 128256
    at, work = 0.0, []
    for _ in range(args.requests):
        at += rng.expovariate(args.rate)
        work.append((at, [rng.randrange(vocab) for _ in range(rng.randint(*args.prompt))]))
    results = [run_mode(mode, args, work) for mode in args.modes]
    print(f"\n{args.requests} requests, prompts {args.prompt[0]}-{args.prompt[1]}, {args.new} new, "
          f"{args.rate}/s Poisson; {results[0]['gpus']} GPU(s)")  # fmt: skip
    head = ("mode", "TTFT p50", "p99", "ITL p50", "p99", "tok/s", "tok/s/GPU")
    print("{:8s} {:>9s} {:>8s} {:>8s} {:>8s} {:>8s} {:>9s}".format(*head))
    for r in results:
        print(f"{r['mode']:8s} {r['ttft_p50_ms']:9.0f} {r['ttft_p99_ms']:8.0f} "
              f"{r['itl_p50_ms']:8.1f} {r['itl_p99_ms']:8.1f} {r['out_tok_s']:8.0f} "
              f"{r['out_tok_s_per_gpu']:9.0f}")  # fmt: skip
    for r in results:
        if "kv_gb" in r:
            print(f"{r['mode']}: {r['kv_transfers']} KV transfers, {r['kv_gb']:.1f} GB at "
                  f"{r['kv_gb_s']:.0f} GB/s (send_kv time)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.png:
        plot(results, args.png)
    return 0


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        for ax, key in zip(axes, ("itl_ms", "ttft_ms"), strict=True):
            xs = r[key]
            ax.plot(xs, [i / len(xs) for i in range(len(xs))], label=r["mode"])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("inter-token latency (ms)")
    axes[1].set_xlabel("time to first token (ms)")
    for ax in axes:
        ax.set_ylabel("fraction")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
