"""G2, host memory: a fixed number of block slots, least recently used evicted first.

This is the index only: which block hash sits in which slot. The bytes live where the engine
keeps them (the torch engine's pinned host tensor, nothing at all in the mocker), behind the
engine's `KvBlockIO`; the slot number is what both sides agree on. Single-threaded: only the
engine's loop touches it.
"""

from __future__ import annotations

from collections import OrderedDict


class HostTier:
    """``capacity`` slots of one block each; hash -> slot with LRU order."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("a host tier needs at least one slot")
        self.capacity = capacity
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._free = list(range(capacity - 1, -1, -1))
        self._pinned: dict[int, int] = {}  # slot -> loads reading it now (not evictable)
        self._orphans: set[int] = set()  # pinned slots whose block was removed meanwhile

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._slots

    def slot_of(self, block_hash: bytes) -> int | None:
        return self._slots.get(block_hash)

    def touch(self, block_hash: bytes) -> None:
        """Mark a block used now (it moves to the back of the eviction order)."""
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)

    def insert(self, block_hash: bytes) -> tuple[int, bytes | None] | None:
        """A slot for a new block, evicting the least recently used unpinned one if full.

        Returns (slot, evicted hash or None), or None when every slot is pinned by a load.
        The caller writes the block's bytes into the slot before anyone reads it.
        """
        assert block_hash not in self._slots, "insert of a block already on the host"
        evicted: bytes | None = None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((h for h, s in self._slots.items() if s not in self._pinned), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
            evicted = victim
        self._slots[block_hash] = slot
        return slot, evicted

    def remove(self, block_hash: bytes) -> int | None:
        """Drop a block (its bytes turned out bad); its slot becomes free."""
        slot = self._slots.pop(block_hash, None)
        if slot is not None:
            if slot in self._pinned:
                self._orphans.add(slot)
            else:
                self._free.append(slot)
        return slot

    def pin(self, slot: int) -> None:
        """Keep a slot from being reused while a load copies from it."""
        self._pinned[slot] = self._pinned.get(slot, 0) + 1

    def is_pinned(self, slot: int) -> bool:
        return slot in self._pinned

    def unpin(self, slot: int) -> None:
        left = self._pinned[slot] - 1
        if left:
            self._pinned[slot] = left
        else:
            del self._pinned[slot]
            if slot in self._orphans:  # removed while pinned: free only now
                self._orphans.discard(slot)
                self._free.append(slot)

    def hashes(self) -> list[bytes]:
        """Every block held, least recently used first."""
        return list(self._slots)
