"""The routing decision: which worker should serve a request, given who caches what.

For each live worker w, with the request's prompt split into B full blocks:

    overlap(w)  = leading prompt blocks w already holds (from the KV indexer)
    prefill(w)  = B - overlap(w)                    blocks w would still have to compute
    load(w)     = blocks the requests this router sent to w and that have not finished yet
                  added there (their prefill blocks: a shared cached prefix adds nothing)
    cost(w)     = overlap_weight * prefill(w) + load(w)

`temperature == 0` picks the cheapest worker (ties broken at random); otherwise workers are
sampled with probability softmax(-cost / temperature), costs normalised by the prompt's block
count so one temperature suits short and long prompts. The router tracks its own assignments
(the caller releases each when its stream ends), so a burst of identical requests does not all
land on the one worker holding their prefix before any metrics could say it is busy. Load
metrics from workers clear assignments a caller never released (a worker reporting itself
idle holds none).
"""

from __future__ import annotations

import math
import random
import time
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
    # assignments never released are dropped once their worker reports idle this long after
    leak_grace_s: float = 5.0

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
    ) -> None:
        self.config = config
        self.indexer = indexer or KvIndexer()
        self.load: dict[int, LoadMetrics] = {}
        self._active: dict[str, tuple[int, int, float]] = {}  # request -> (worker, blocks, at)
        self._inflight: dict[int, int] = {}  # worker -> blocks its unfinished requests added
        self._rng = random.Random(seed)
        self._rr = 0
        self._anonymous = 0

    # ---- inputs -------------------------------------------------------------------------

    def update_load(self, metrics: LoadMetrics, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.load[metrics.worker_id] = metrics
        if metrics.running == 0 and metrics.waiting == 0 and self._inflight.get(metrics.worker_id):
            for request_id, (worker, _, at) in list(self._active.items()):
                if worker == metrics.worker_id and now - at > self.config.leak_grace_s:
                    self.release(request_id)

    def release(self, request_id: str) -> None:
        """The request's stream ended: its blocks no longer load its worker."""
        entry = self._active.pop(request_id, None)
        if entry is not None:
            worker, blocks, _ = entry
            self._inflight[worker] = max(self._inflight.get(worker, 0) - blocks, 0)

    def remove_worker(self, worker_id: int) -> None:
        self.load.pop(worker_id, None)
        self._inflight.pop(worker_id, None)
        for request_id, (worker, _, _) in list(self._active.items()):
            if worker == worker_id:
                del self._active[request_id]
        self.indexer.remove_worker(worker_id)

    def inflight_blocks(self, worker_id: int) -> int:
        return self._inflight.get(worker_id, 0)

    # ---- the decision -------------------------------------------------------------------

    def choose(
        self,
        token_ids: list[int],
        workers: list[int],
        request_id: str | None = None,
        now: float | None = None,
    ) -> Decision:
        """Pick a worker and count the request against it until `release(request_id)`."""
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
            decision = self._choose_kv(hashes, workers)
        if decision.overlap_blocks == 0 and self.config.mode != "kv" and hashes:
            decision.overlap_blocks = self.indexer.find_matches(hashes).get(decision.worker_id, 0)
        if request_id is None:
            self._anonymous += 1
            request_id = f"_anonymous-{self._anonymous}"
        self.release(request_id)  # a retried id must not count twice
        blocks = len(hashes) - decision.overlap_blocks + 1  # +1: the block decode grows into
        self._active[request_id] = (decision.worker_id, blocks, now)
        self._inflight[decision.worker_id] = self._inflight.get(decision.worker_id, 0) + blocks
        return decision

    def _choose_kv(self, hashes: list[int], workers: list[int]) -> Decision:
        overlaps = self.indexer.find_matches(hashes) if hashes else {}
        blocks = len(hashes)
        costs: dict[int, float] = {}
        for w in workers:
            overlap = overlaps.get(w, 0)
            prefill = blocks - overlap
            costs[w] = self.config.overlap_weight * prefill + self._inflight.get(w, 0)
        if self.config.temperature <= 0:
            best = min(costs.values())
            chosen = self._rng.choice([w for w, c in costs.items() if c == best])
        else:
            scale = max(blocks, 1) * self.config.temperature
            top = min(costs.values())
            weights = [math.exp(-(costs[w] - top) / scale) for w in workers]
            chosen = self._rng.choices(workers, weights)[0]
        return Decision(chosen, overlaps.get(chosen, 0), blocks, costs)
