"""KvIndexer at router scale: how fast ``find_matches`` is with 64 workers and ~1M blocks.

What is measured
----------------
* Build: ``--blocks`` distinct chained block hashes (random 64-bit ints, as the wire carries),
  laid out as chains of ``--request-blocks`` blocks (one chain = one long shared prefix, e.g. a
  system prompt plus history). Each chain is held by 1-8 random workers of ``--workers``; each
  holder has a random prefix of it (the first one and half the others: all of it), published
  as one ``BlockStored`` batch. Reported: blocks applied per second and the index's memory
  (RSS delta; ``--tracemalloc`` for Python-allocated bytes, slower).
* Query: ``--queries`` requests of ``--request-blocks`` blocks, in three mixes:
  ``full-hit`` (a whole chain: the walk never stops early, the worst case), ``diverge`` (a
  chain's prefix of random length, then unknown hashes), ``miss`` (unknown first block).
  A *decision* is ``find_matches`` plus picking the worker with the most overlap. Reported:
  decisions/s and p50/p99 latency of ``find_matches`` in microseconds (``time.perf_counter_ns``).

Usage::

    python benchmarks/indexer_bench.py [--workers 64] [--blocks 1000000] [--request-blocks 256]
        [--queries 20000] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc

import psutil

from dynamo_sdk.llm.kv.events import BlockStored, KvEventBatch
from dynamo_sdk.llm.kv.indexer import KvIndexer


def build(
    args: argparse.Namespace, rng: random.Random
) -> tuple[KvIndexer, list[list[int]], int, float]:
    n_chains = max(1, args.blocks // args.request_blocks)
    chains = [[rng.getrandbits(64) for _ in range(args.request_blocks)] for _ in range(n_chains)]
    seqs = [0] * args.workers
    stored = 0
    batches = []
    for chain in chains:
        holders = rng.sample(range(args.workers), rng.randint(1, 8))
        for i, worker in enumerate(holders):
            full = i == 0 or rng.random() < 0.5  # someone holds all of it: every block indexed
            length = len(chain) if full else rng.randint(1, len(chain))
            event = BlockStored(chain[:length], None, [], 16)
            batches.append(KvEventBatch(worker, seqs[worker], [event]))
            seqs[worker] += 1
            stored += length
    index = KvIndexer()
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    if args.tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    for batch in batches:
        index.apply(batch)
    elapsed = time.perf_counter() - t0
    if args.tracemalloc:
        mem = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    else:
        mem = psutil.Process().memory_info().rss - rss0
    print(
        f"build: {index.num_blocks():,} blocks, {stored:,} (block, worker) pairs, "
        f"{len(batches):,} batches in {elapsed:.2f} s = {stored / elapsed:,.0f} blocks/s"
    )
    return index, chains, mem, elapsed


def requests(kind: str, chains: list[list[int]], n: int, rng: random.Random) -> list[list[int]]:
    out = []
    for _ in range(n):
        chain = rng.choice(chains)
        if kind == "full-hit":
            out.append(chain)
        elif kind == "diverge":
            k = rng.randint(1, len(chain) - 1)
            out.append(chain[:k] + [rng.getrandbits(64) for _ in range(len(chain) - k)])
        else:
            out.append([rng.getrandbits(64) for _ in range(len(chain))])
    return out


def measure(index: KvIndexer, reqs: list[list[int]]) -> tuple[float, float, float, float]:
    """(decisions/s, p50 us, p99 us, mean matched workers) over ``reqs``."""
    find = index.find_matches
    for req in reqs[:200]:  # warm up
        find(req)
    lat = []
    matched = 0
    t0 = time.perf_counter()
    for req in reqs:
        s = time.perf_counter_ns()
        scores = find(req)
        lat.append(time.perf_counter_ns() - s)
        if scores:
            max(scores, key=scores.__getitem__)  # the routing decision proper
        matched += len(scores)
    total = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100)
    return len(reqs) / total, q[49] / 1000, q[98] / 1000, matched / len(reqs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--request-blocks", type=int, default=256)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    index, chains, mem, _ = build(args, rng)
    how = "tracemalloc" if args.tracemalloc else "RSS delta"
    print(f"index memory ({how}): {mem / 2**20:,.0f} MiB = {mem / index.num_blocks():.0f} B/block")
    print(f"\n{'requests':<9} {'decisions/s':>12} {'p50 us':>8} {'p99 us':>8} {'workers hit':>12}")
    for kind in ("full-hit", "diverge", "miss"):
        rate, p50, p99, hit = measure(index, requests(kind, chains, args.queries, rng))
        print(f"{kind:<9} {rate:>12,.0f} {p50:>8.1f} {p99:>8.1f} {hit:>12.1f}")


if __name__ == "__main__":
    main()
