"""Global prefix index: which workers hold which cached blocks, for KV-aware routing.

Block hashes are chained (each commits to its whole prefix), so "worker W holds the first k
blocks of this request" is just "W holds hashes h_0 .. h_{k-1}": no tree is needed, a flat map
does. Each hash maps to an int bitmask of the workers holding it (one bit per worker slot), so
``find_matches`` walks the request's hashes ANDing masks and stops at the first block no worker
holds: one dict lookup and an int AND per block, independent of the number of workers. (The
lookups' cache misses in a 1M-entry dict dominate; a C-level running AND over all blocks was
measured slower, because it cannot stop early.)

Events may be lost, repeated or reordered on the way. The index only ever under- or
over-estimates overlap, which costs routing quality, never correctness, so it tolerates all of
it: unknown parents are ignored (the hash alone identifies the prefix), removing a hash not held
is a no-op, a batch whose ``seq`` is not newer than the last applied one is dropped, and a
``seq`` gap is logged, counted and reported by ``needs_resync`` until the worker's state is
rebuilt (``remove_worker``, or a batch that starts with ``AllBlocksCleared``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from dynamo_sdk.llm.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch

logger = logging.getLogger(__name__)


class KvIndexer:
    """Maps chained block hashes to the workers that hold them; answers prefix-overlap queries."""

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}  # block hash -> bitmask of worker slots holding it
        self._slot_of: dict[int, int] = {}  # worker id -> slot (bit index)
        self._worker_at: dict[int, int] = {}  # slot -> worker id
        self._free_slots: list[int] = []
        self._held: dict[int, set[int]] = {}  # worker id -> hashes it holds
        self._last_seq: dict[int, int] = {}
        self._resync: set[int] = set()
        self.gaps = 0  # batches that arrived after a seq gap
        self.stale = 0  # duplicate or out-of-date batches dropped

    # -- updates -----------------------------------------------------------------------------

    def apply(self, batch: KvEventBatch) -> None:
        """Apply one worker's event batch (see the module docstring for the ordering rules)."""
        worker = batch.worker_id
        last = self._last_seq.get(worker)
        if last is not None and batch.seq <= last:
            self.stale += 1
            logger.debug("worker %d: stale batch seq %d (last %d)", worker, batch.seq, last)
            return
        if last is not None and batch.seq != last + 1:
            self.gaps += 1
            self._resync.add(worker)
            logger.warning("worker %d: KV event gap, seq %d after %d", worker, batch.seq, last)
        self._last_seq[worker] = batch.seq
        if batch.events and isinstance(batch.events[0], AllBlocksCleared):
            self._resync.discard(worker)  # everything after this is a full rebuild
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(worker, event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self._remove(worker, event.block_hashes)
            else:
                self._clear(worker)

    def remove_worker(self, worker_id: int) -> None:
        """Forget a worker entirely (it left, or its state will be rebuilt from scratch)."""
        self._clear(worker_id)
        self._held.pop(worker_id, None)
        self._last_seq.pop(worker_id, None)
        self._resync.discard(worker_id)
        slot = self._slot_of.pop(worker_id, None)
        if slot is not None:
            del self._worker_at[slot]
            self._free_slots.append(slot)

    # -- queries -----------------------------------------------------------------------------

    def find_matches(self, block_hashes: list[int]) -> dict[int, int]:
        """For each worker holding block 0, how many leading blocks of the request it holds.

        Workers without block 0 are left out (their overlap is 0).
        """
        get = self._masks.get
        worker_at = self._worker_at
        scores: dict[int, int] = {}
        alive = -1  # all bits: before block 0 every worker is a candidate
        depth = 0
        for h in block_hashes:
            mask = get(h, 0) & alive
            if mask != alive:  # someone dropped out (always true at block 0: masks are >= 0)
                dropped = alive ^ mask if depth else 0
                while dropped:
                    low = dropped & -dropped
                    scores[worker_at[low.bit_length() - 1]] = depth
                    dropped ^= low
                if not mask:
                    return scores  # stop at the first block nobody holds
                alive = mask
            depth += 1
        while alive > 0:
            low = alive & -alive
            scores[worker_at[low.bit_length() - 1]] = depth
            alive ^= low
        return scores

    def num_blocks(self) -> int:
        """Distinct block hashes held by at least one worker."""
        return len(self._masks)

    def blocks_of(self, worker_id: int) -> int:
        """How many blocks the index believes ``worker_id`` holds."""
        return len(self._held.get(worker_id, ()))

    def workers(self) -> list[int]:
        return list(self._slot_of)

    def needs_resync(self, worker_id: int) -> bool:
        """True if events of this worker were lost since its state was last rebuilt."""
        return worker_id in self._resync

    # -- internals ---------------------------------------------------------------------------

    def _slot(self, worker: int) -> int:
        slot = self._slot_of.get(worker)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slot_of)
            self._slot_of[worker] = slot
            self._worker_at[slot] = worker
            self._held[worker] = set()
        return slot

    def _store(self, worker: int, hashes: Iterable[int]) -> None:
        bit = 1 << self._slot(worker)
        held = self._held[worker]
        masks = self._masks
        for h in hashes:
            masks[h] = masks.get(h, 0) | bit
            held.add(h)

    def _remove(self, worker: int, hashes: Iterable[int]) -> None:
        held = self._held.get(worker)
        if not held:
            return
        clear = ~(1 << self._slot_of[worker])
        masks = self._masks
        for h in hashes:
            if h in held:
                held.discard(h)
                mask = masks[h] & clear
                if mask:
                    masks[h] = mask
                else:
                    del masks[h]

    def _clear(self, worker: int) -> None:
        held = self._held.get(worker)
        if held:
            self._remove(worker, list(held))
