"""The routing decision: which worker should serve a request, given who caches what, where.

For each live worker w, with the request's prompt split into B full blocks:

    overlap(w)  = leading prompt blocks w can use without computing them (from the KV
                  indexer), by the tier it would take each from: device(w) in its GPU,
                  host(w) in its host memory, disk(w) on its local disk, shared(w) in shared
                  storage (each block counted once, in its fastest tier)
    credited(w) = device(w) + host_weight * host(w) + disk_weight * disk(w)
                  + shared_weight * shared(w)
    load(w)     = blocks the requests this router sent to w and that have not finished yet
                  added there (their prompt blocks not already on w's GPU: a block loaded
                  from host or disk still takes a GPU block)
    cost(w)     = overlap_weight * (B - credited(w)) + load(w)

The tier weights are what a block found in that tier is worth next to one already on the GPU
(1.0): a host block is a PCIe copy away (0.75 by default), a disk or shared-storage block costs
storage I/O and then the copy (0.25), which is still cheaper than recomputing it but may not
be by much on a fast GPU with slow storage. The host and disk defaults are NVIDIA Dynamo's
(its ``host_cache_hit_weight`` and ``disk_cache_hit_weight``); shared storage gets the disk
credit. Tune them per deployment (time a load against a prefill of the same blocks).
``tier_aware=False`` ignores everything but the GPU (``credited = device``): the router as it
was before tiers, kept to compare against.

`temperature == 0` picks the cheapest worker (ties broken at random); otherwise workers are
sampled with probability softmax(-cost / temperature), costs normalised by the prompt's block
count so one temperature suits short and long prompts. The router tracks its own assignments
(the caller releases each when its stream ends), so a burst of identical requests does not all
land on the one worker holding their prefix before any metrics could say it is busy. Load
metrics from workers clear assignments a caller never released (a worker reporting itself
idle holds none).

Every decision's ``workers`` are the live instances discovery lists, so the router hands them
to its indexer (`KvIndexer.admit`): from then on events and load of worker ids discovery has
not shown are held or ignored, not indexed (anyone on NATS can publish them), and a worker
forgotten with `remove_worker` (its lease ended) stays out until discovery shows it again.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal

from dynamo_sdk.llm.kv.events import LoadMetrics
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.indexer import NO_OVERLAP, KvIndexer, TierOverlap

RouterMode = Literal["kv", "round_robin", "random"]


@dataclass
class RouterConfig:
    mode: RouterMode = "kv"
    block_size: int = 16
    overlap_weight: float = 1.0
    temperature: float = 0.0
    # assignments never released are dropped once their worker reports idle this long after
    leak_grace_s: float = 5.0
    # what a prompt block found in each tier below the GPU is worth next to a GPU hit (1.0)
    host_weight: float = 0.75
    disk_weight: float = 0.25
    shared_weight: float = 0.25
    tier_aware: bool = True  # False: credit GPU hits only (the router before tiers)

    def __post_init__(self) -> None:
        if self.mode not in ("kv", "round_robin", "random"):
            raise ValueError(f"router mode must be kv, round_robin or random, got {self.mode!r}")
        if not (self.block_size >= 1 and self.temperature >= 0 and self.overlap_weight >= 0):
            raise ValueError("block_size >= 1, temperature >= 0 and overlap_weight >= 0 required")
        for name in ("host_weight", "disk_weight", "shared_weight"):
            weight = getattr(self, name)
            if not 0.0 <= weight <= 1.0:  # NaN fails too
                raise ValueError(f"{name} must be between 0 and 1 (a GPU hit is 1), got {weight}")


@dataclass
class Decision:
    """The chosen worker. ``overlap_blocks``: the prompt's leading blocks already on its GPU
    (what it will not compute nor allocate); ``tiers``: its usable prefix by tier (kv mode with
    ``tier_aware``; None otherwise); ``costs``: every candidate's cost (kv mode)."""

    worker_id: int
    overlap_blocks: int
    prompt_blocks: int
    costs: dict[int, float] = field(default_factory=dict)
    tiers: TierOverlap | None = None


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
        """A worker's load snapshot (ignored for a worker discovery has not shown)."""
        if not self.indexer.is_known(metrics.worker_id):
            return
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
        if self.indexer.admit(workers):  # discovery's live instances (module docstring)
            for gone in [w for w in self.load if not self.indexer.is_known(w)]:
                del self.load[gone]  # reported before the router followed discovery
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
        # The load a request adds is the prefill work it brings (what `load` weighs against
        # overlap): a block loaded from host or disk is credited as in the cost. Counting it
        # in full made a worker that holds its sessions' history below the device look busy
        # and pushed their next turns elsewhere (kv_tiers_bench: half the follow-ups moved).
        credited = decision.overlap_blocks
        if decision.tiers is not None:
            t, c = decision.tiers, self.config
            credited = round(t.device + c.host_weight * t.host + c.disk_weight * t.disk
                             + c.shared_weight * t.shared)  # fmt: skip
        blocks = len(hashes) - credited + 1  # +1: the block decode grows into
        self._active[request_id] = (decision.worker_id, blocks, now)
        self._inflight[decision.worker_id] = self._inflight.get(decision.worker_id, 0) + blocks
        return decision

    def _choose_kv(self, hashes: list[int], workers: list[int]) -> Decision:
        blocks = len(hashes)
        config = self.config
        inflight = self._inflight
        costs: dict[int, float] = {}
        tiered: dict[int, TierOverlap] = {}
        device: dict[int, int] = {}
        if config.tier_aware:
            tiered = self.indexer.find_tiered_matches(hashes, workers) if hashes else {}
            hw, dw, sw = config.host_weight, config.disk_weight, config.shared_weight
            for w in workers:
                o = tiered.get(w)
                credited = (
                    0.0 if o is None else o.device + hw * o.host + dw * o.disk + sw * o.shared
                )
                costs[w] = config.overlap_weight * (blocks - credited) + inflight.get(w, 0)
        else:
            device = self.indexer.find_matches(hashes) if hashes else {}
            for w in workers:
                prefill = blocks - device.get(w, 0)
                costs[w] = config.overlap_weight * prefill + inflight.get(w, 0)
        if config.temperature <= 0:
            best = min(costs.values())
            chosen = self._rng.choice([w for w, c in costs.items() if c == best])
        else:
            scale = max(blocks, 1) * config.temperature
            top = min(costs.values())
            weights = [math.exp(-(costs[w] - top) / scale) for w in workers]
            chosen = self._rng.choices(workers, weights)[0]
        if config.tier_aware:
            tiers = tiered.get(chosen, NO_OVERLAP)
            return Decision(chosen, tiers.device, blocks, costs, tiers)
        return Decision(chosen, device.get(chosen, 0), blocks, costs)
