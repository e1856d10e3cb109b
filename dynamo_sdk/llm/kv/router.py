"""The routing decision: which worker should serve a request, given who caches what.

For each live worker w, with the request's prompt split into B full blocks:

    overlap(w)  = leading prompt blocks w already holds (from the KV indexer)
    prefill(w)  = B - overlap(w)                    blocks w would still have to compute
    load(w)     = active_blocks(w) + pending(w)     its decode load: KV blocks in use (latest
                                                    load metrics) plus blocks this router sent
                                                    it since those metrics were published
    cost(w)     = overlap_weight * prefill(w) + load(w)

`temperature == 0` picks the cheapest worker (ties broken at random); otherwise workers are
sampled with probability softmax(-cost / temperature), costs normalised by the prompt's block
count so one temperature suits short and long prompts. Counting the router's own pending
assignments keeps a burst of identical requests from all landing on the one worker that holds
their prefix before its metrics catch up.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from dynamo_sdk.llm.kv.events import LoadMetrics
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.indexer import KvIndexer

RouterMode = Literal["kv", "round_robin", "random"]


@dataclass
class RouterConfig:
    mode: RouterMode = "kv"
    block_size: int = 16
    overlap_weight: float = 1.0
    temperature: float = 0.0
    # how long a pending assignment counts before the worker's own metrics must reflect it
    pending_horizon_s: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("kv", "round_robin", "random"):
            raise ValueError(f"router mode must be kv, round_robin or random, got {self.mode!r}")
        if self.block_size < 1 or self.temperature < 0 or self.overlap_weight < 0:
            raise ValueError("block_size >= 1, temperature >= 0 and overlap_weight >= 0 required")


@dataclass
class Decision:
    worker_id: int
    overlap_blocks: int
    prompt_blocks: int
    costs: dict[int, float] = field(default_factory=dict)


class KvRouter:
    """Picks workers; fed with KV events (through its indexer) and load metrics."""

    def __init__(
        self, config: RouterConfig, indexer: KvIndexer | None = None, seed: int | None = None
    ):
        self.config = config
        self.indexer = indexer or KvIndexer()
        self.load: dict[int, LoadMetrics] = {}
        self._load_at: dict[int, float] = {}
        self._pending: dict[int, deque[tuple[float, int]]] = {}
        self._rng = random.Random(seed)
        self._rr = 0

    # ---- inputs -------------------------------------------------------------------------

    def update_load(self, metrics: LoadMetrics, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.load[metrics.worker_id] = metrics
        self._load_at[metrics.worker_id] = now
        # assignments made before these metrics were published are counted in them now
        pending = self._pending.get(metrics.worker_id)
        while pending and pending[0][0] <= now - 0.05:
            pending.popleft()

    def remove_worker(self, worker_id: int) -> None:
        self.load.pop(worker_id, None)
        self._load_at.pop(worker_id, None)
        self._pending.pop(worker_id, None)
        self.indexer.remove_worker(worker_id)

    # ---- the decision -------------------------------------------------------------------

    def choose(
        self, token_ids: list[int], workers: list[int], now: float | None = None
    ) -> Decision:
        if not workers:
            raise ValueError("no workers to choose from")
        now = time.monotonic() if now is None else now
        hashes = block_hashes_int(token_ids, self.config.block_size)
        workers = sorted(workers)
        if self.config.mode == "round_robin":
            chosen = workers[self._rr % len(workers)]
            self._rr += 1
            decision = Decision(chosen, 0, len(hashes))
        elif self.config.mode == "random":
            decision = Decision(self._rng.choice(workers), 0, len(hashes))
        else:
            decision = self._choose_kv(hashes, workers, now)
        if decision.overlap_blocks == 0 and self.config.mode != "kv" and hashes:
            decision.overlap_blocks = self.indexer.find_matches(hashes).get(decision.worker_id, 0)
        self._assign(decision.worker_id, len(hashes) - decision.overlap_blocks + 1, now)
        return decision

    def _choose_kv(self, hashes: list[int], workers: list[int], now: float) -> Decision:
        overlaps = self.indexer.find_matches(hashes) if hashes else {}
        blocks = len(hashes)
        costs: dict[int, float] = {}
        for w in workers:
            overlap = overlaps.get(w, 0)
            prefill = blocks - overlap
            costs[w] = self.config.overlap_weight * prefill + self._decode_load(w, now)
        if self.config.temperature <= 0:
            best = min(costs.values())
            chosen = self._rng.choice([w for w, c in costs.items() if c == best])
        else:
            scale = max(blocks, 1) * self.config.temperature
            top = min(costs.values())
            weights = [math.exp(-(costs[w] - top) / scale) for w in workers]
            chosen = self._rng.choices(workers, weights)[0]
        return Decision(chosen, overlaps.get(chosen, 0), blocks, costs)

    def _decode_load(self, worker_id: int, now: float) -> float:
        metrics = self.load.get(worker_id)
        active = metrics.active_blocks if metrics is not None else 0
        pending = self._pending.get(worker_id)
        if pending:
            while pending and pending[0][0] < now - self.config.pending_horizon_s:
                pending.popleft()
        return float(active + sum(b for _, b in pending or ()))

    def _assign(self, worker_id: int, blocks: int, now: float) -> None:
        self._pending.setdefault(worker_id, deque()).append((now, max(blocks, 1)))
