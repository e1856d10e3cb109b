"""Paged KV-block bookkeeping with prefix caching, shared by the mocker and our own engine.

Small on purpose (nano-vllm style) and strict: invariants are asserted, not hoped for. It
mirrors vLLM's block pool where routing depends on it, so the events a mocker publishes look
like a real worker's:

* Only full blocks are hashed (``hashing.block_hash``, chained); a hashed block is findable by
  its hash while it holds KV, in use or not.
* A block is registered (findable, announced by ``BlockStored``) only once its KV is computed,
  i.e. once every one of its tokens lies below the sequence's *computed watermark*. A real engine
  raises the watermark with ``mark_computed`` when it schedules a chunk: the chunk's KV is written
  in that step, before any later request can read it, and a token that was sampled but never fed
  back (the last one of a finished request) never makes its block look cached. ``allocate``
  defaults to "the whole prompt is computed in this step", which is what a simulation wants.
* A prompt reuses its longest cached full-block prefix, verified against the stored token ids
  and parent hash (a hash match alone is not trusted). As in vLLM at least one prompt token is
  always computed, so a fully cached prompt recomputes its last block into a fresh block.
* Freed hashed blocks stay cached and become evictable, least recently used first; a sequence
  frees tail-first so a prefix's tail is evicted before its head. Never-hashed free blocks are
  handed out before any cached block is evicted.
* One physical block per hash: a newly full block whose hash is already cached elsewhere stays
  unregistered (no event), so every registered hash is advertised exactly once and a
  ``BlockRemoved`` always means the worker no longer holds that hash.

Events (``BlockStored`` when blocks get registered, ``BlockRemoved`` when evicted,
``AllBlocksCleared``) go to ``on_events`` as one list per operation, hashes in wire form.

A tier stack below (``kv/tiers``) follows the same two moments through ``tiers``: a block
registered (its KV is computed by the step being scheduled) and a cached block evicted (its KV
is intact until the next step runs), which is when it can copy a block out of the device.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dynamo_sdk.llm.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from dynamo_sdk.llm.kv.hashing import block_hash, hash_to_int


class DeviceBlockHooks(Protocol):
    """What a tier stack below the device cache is told (see the module docstring)."""

    def device_stored(self, block_id: int, block_hash: bytes) -> None: ...

    def device_evicted(self, block_id: int, block_hash: bytes) -> None: ...


class NoFreeBlocksError(Exception):
    """Not enough free or evictable blocks; the manager's state is unchanged."""


@dataclass
class Allocation:
    """A prompt's blocks; the first ``num_cached_tokens`` tokens' KV is already there."""

    block_ids: list[int]
    num_cached_tokens: int


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while registered in the prefix cache
    parent: bytes | None = None  # registered blocks: parent hash and tokens, to verify hits
    token_ids: tuple[int, ...] = ()


@dataclass
class _Seq:
    token_ids: list[int]
    block_ids: list[int]
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks
    num_computed: int = 0  # tokens whose KV exists (or is written in the current step)
    num_registered: int = 0  # leading full blocks already offered to the prefix cache


class BlockManager:
    """Allocates fixed-size KV blocks to sequences and keeps freed full blocks as a prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        on_events: Callable[[list[KvEvent]], None] | None = None,
        tiers: DeviceBlockHooks | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._on_events = on_events
        self.tiers = tiers
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # unhashed, ref_count 0
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed, ref_count 0; LRU first
        self._by_hash: dict[bytes, int] = {}
        self._seqs: dict[str, _Seq] = {}
        self._num_active = 0
        self._queried_tokens = 0
        self._hit_tokens = 0

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: never-used/unhashed ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_active_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self._num_active

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by sequences (cached-but-idle blocks count as free)."""
        return self._num_active / self.num_blocks

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._seqs[seq_id].block_ids)

    def num_tokens(self, seq_id: str) -> int:
        return len(self._seqs[seq_id].token_ids)

    def cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached full-block prefix of ``token_ids`` (all of it
        may match, unlike ``allocate``, which always leaves a token to compute)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        out: list[int] = []
        parent: bytes | None = None
        for start in range(0, len(token_ids) - bs + 1, bs):
            tokens = tuple(token_ids[start : start + bs])
            h = block_hash(parent, tokens)
            bid = self._by_hash.get(h)
            if bid is None or self._blocks[bid].token_ids != tokens:
                break
            out.append(bid)
            parent = h
        return out

    def match(self, token_ids: Sequence[int]) -> tuple[int, list[bytes]]:
        """(leading full blocks ``allocate`` would reuse, every full block's chained hash)."""
        hits, hashes = self._match_prefix(token_ids)
        return len(hits), hashes

    def stats(self) -> tuple[int, int]:
        """(prompt tokens queried against the prefix cache, tokens that hit), since creation."""
        return self._queried_tokens, self._hit_tokens

    # -- allocation --------------------------------------------------------------------------

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        hits, _ = self._match_prefix(token_ids)
        return self._blocks_needed(len(token_ids), hits) <= self._available_with(hits)

    def allocate(
        self,
        seq_id: str,
        token_ids: Sequence[int],
        num_computed: int | None = None,
        *,
        query: bool = True,
    ) -> Allocation:
        """Give a prompt its blocks, reusing its cached prefix.

        ``num_computed`` is how many of its tokens will have KV by the end of the current step
        (default: all); full blocks below it are registered in the prefix cache now, the rest
        when ``mark_computed`` reaches them. ``query``: count the lookup in the prefix-cache
        hit rate (not for a preempted sequence's re-admission, as vLLM counts them apart:
        its own blocks found again would inflate the rate).
        """
        assert seq_id not in self._seqs, f"sequence {seq_id!r} already allocated"
        hits, hashes = self._match_prefix(token_ids)
        needed = self._blocks_needed(len(token_ids), hits)
        if needed > self._available_with(hits):
            raise NoFreeBlocksError(
                f"need {needed} blocks, {self._available_with(hits)} free or evictable"
            )
        events: list[KvEvent] = []
        block_ids: list[int] = []
        for bid in hits:
            self._ref(bid)
            block_ids.append(bid)
        for _ in range(needed):
            block_ids.append(self._take_block(events))
        num_cached = len(hits) * self.block_size
        seq = _Seq(list(token_ids), block_ids, hashes, num_computed=num_cached)
        seq.num_registered = len(hits)
        self._seqs[seq_id] = seq
        computed = len(token_ids) if num_computed is None else num_computed
        self._raise_watermark(seq, max(computed, num_cached), events)
        if query:
            self._queried_tokens += len(token_ids)
            self._hit_tokens += num_cached
        self._emit(events)
        return Allocation(list(block_ids), num_cached)

    def append_token(self, seq_id: str, token_id: int) -> None:
        """Grow a sequence by one (sampled, not yet computed) token, taking a block if needed.

        Its block is hashed and registered only when ``mark_computed`` covers the token, so an
        engine that runs ahead of its outputs may append a placeholder and ``set_token`` the
        real id once it is known.
        """
        seq = self._seqs[seq_id]
        events: list[KvEvent] = []
        if len(seq.token_ids) == len(seq.block_ids) * self.block_size:
            if self.num_free_blocks == 0:
                raise NoFreeBlocksError(f"no block for token {len(seq.token_ids)} of {seq_id!r}")
            seq.block_ids.append(self._take_block(events))
        seq.token_ids.append(token_id)
        self._emit(events)

    def set_token(self, seq_id: str, index: int, token_id: int) -> None:
        """Replace a placeholder appended earlier (its block must not be hashed yet)."""
        seq = self._seqs[seq_id]
        if index < len(seq.hashes) * self.block_size:
            raise ValueError(f"{seq_id!r}: token {index} is in an already hashed block")
        seq.token_ids[index] = token_id

    def mark_computed(self, seq_id: str, num_tokens: int) -> None:
        """Record that the first ``num_tokens`` tokens' KV is (being) written this step.

        Full blocks now entirely computed become prefix-cache entries (``BlockStored``).
        """
        seq = self._seqs[seq_id]
        if not 0 <= num_tokens <= len(seq.token_ids):
            raise ValueError(
                f"{seq_id!r}: {num_tokens} computed tokens of a {len(seq.token_ids)}-token sequence"
            )
        events: list[KvEvent] = []
        self._raise_watermark(seq, num_tokens, events)
        self._emit(events)

    def num_computed(self, seq_id: str) -> int:
        return self._seqs[seq_id].num_computed

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks, tail first; hashed ones stay cached until evicted."""
        seq = self._seqs.pop(seq_id)
        for bid in reversed(seq.block_ids):
            block = self._blocks[bid]
            assert block.ref_count > 0, f"block {bid} freed more often than referenced"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._num_active -= 1
                if block.hash is not None:
                    self._evictable[bid] = None  # most recently used: evicted last
                else:
                    self._free.append(bid)

    def clear_cache(self) -> None:
        """Forget every cached block no sequence uses (e.g. after a weights reload)."""
        dropped = [self._unregister(bid, evicting=False) for bid in self._evictable]
        self._free.extend(self._evictable)
        self._evictable.clear()
        if self._num_active == 0:
            assert not self._by_hash
            self._emit([AllBlocksCleared()])
        elif dropped:
            self._emit([BlockRemoved([hash_to_int(h) for h in dropped])])

    def check_invariants(self) -> None:
        """Cross-check every index against the blocks (O(num_blocks); for tests and debugging)."""
        refs = [0] * self.num_blocks
        bs = self.block_size
        for seq in self._seqs.values():
            assert len(seq.block_ids) == -(-len(seq.token_ids) // self.block_size)
            full_blocks = len(seq.token_ids) // self.block_size
            assert len(seq.hashes) <= (full_blocks if self.enable_prefix_caching else 0)
            assert seq.num_registered <= len(seq.hashes)
            if self.enable_prefix_caching:  # every computed full block is hashed
                assert len(seq.hashes) >= min(seq.num_computed, len(seq.token_ids)) // bs
            for bid in seq.block_ids:
                refs[bid] += 1
        for block in self._blocks:
            assert block.ref_count == refs[block.block_id], block
            in_free = block.block_id in self._free
            in_evictable = block.block_id in self._evictable
            assert in_free + in_evictable + (block.ref_count > 0) == 1, block
            assert in_evictable <= (block.hash is not None)
            assert in_free <= (block.hash is None)
            if block.hash is not None:
                assert self._by_hash[block.hash] == block.block_id
        assert len(self._by_hash) == sum(b.hash is not None for b in self._blocks)
        assert self._num_active == sum(r > 0 for r in refs)

    # -- internals ---------------------------------------------------------------------------

    def _raise_watermark(self, seq: _Seq, num_tokens: int, events: list[KvEvent]) -> None:
        """Register the full blocks below a raised computed watermark (never lowers it)."""
        seq.num_computed = max(seq.num_computed, num_tokens)
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        last = seq.num_computed // bs
        while len(seq.hashes) < last:  # hash the newly computed full blocks, chained
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes.append(block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        first = seq.num_registered
        if last <= first:
            return
        seq.num_registered = last
        self._emit_stored(seq, first, [self._register(seq, i) for i in range(first, last)], events)

    def _match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Cached block ids of the longest reusable prefix, and the prompt's full-block hashes."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        hashes: list[bytes] = []
        hits: list[int] = []
        # At least one token must be computed: a prompt may reuse at most (len - 1) tokens.
        max_hits = max(len(token_ids) - 1, 0) // bs
        parent: bytes | None = None
        for start in range(0, len(token_ids) - bs + 1, bs):
            tokens = tuple(token_ids[start : start + bs])
            h = block_hash(parent, tokens)
            if len(hits) == len(hashes) and len(hits) < max_hits:
                bid = self._by_hash.get(h)
                if bid is not None:
                    block = self._blocks[bid]
                    if block.token_ids == tokens and block.parent == parent:
                        hits.append(bid)
            hashes.append(h)
            parent = h
        return hits, hashes

    def _blocks_needed(self, num_tokens: int, hits: list[int]) -> int:
        return -(-num_tokens // self.block_size) - len(hits)

    def _available_with(self, hits: list[int]) -> int:
        """Free + evictable blocks once the hit blocks (some evictable) are taken into use."""
        return self.num_free_blocks - sum(self._blocks[bid].ref_count == 0 for bid in hits)

    def _ref(self, bid: int) -> None:
        block = self._blocks[bid]
        if block.ref_count == 0:
            del self._evictable[bid]
            self._num_active += 1
        block.ref_count += 1

    def _take_block(self, events: list[KvEvent]) -> int:
        """A block with ref_count 1: a never-hashed free one, else evict the LRU cached one."""
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._evictable.popitem(last=False)
            events.append(BlockRemoved([hash_to_int(self._unregister(bid, evicting=True))]))
        block = self._blocks[bid]
        assert block.ref_count == 0 and block.hash is None
        block.ref_count = 1
        self._num_active += 1
        return bid

    def _register(self, seq: _Seq, i: int) -> bool:
        """Cache full block ``i`` of ``seq`` by its hash; False if that hash is already cached."""
        if not self.enable_prefix_caching:
            return False
        h = seq.hashes[i]
        if h in self._by_hash:
            return False
        block = self._blocks[seq.block_ids[i]]
        assert block.hash is None
        start = i * self.block_size
        block.hash = h
        block.parent = seq.hashes[i - 1] if i > 0 else None
        block.token_ids = tuple(seq.token_ids[start : start + self.block_size])
        self._by_hash[h] = block.block_id
        if self.tiers is not None:
            self.tiers.device_stored(block.block_id, h)
        return True

    def _unregister(self, bid: int, *, evicting: bool) -> bytes:
        block = self._blocks[bid]
        h = block.hash
        assert h is not None and self._by_hash[h] == bid
        if evicting and self.tiers is not None:
            self.tiers.device_evicted(bid, h)
        del self._by_hash[h]
        block.hash, block.parent, block.token_ids = None, None, ()
        return h

    def cached_hashes(self) -> list[bytes]:
        """The hash of every block in the prefix cache (in use or evictable): the device
        part of a KV snapshot (`kv/resync.py`)."""
        return list(self._by_hash)

    def _emit_stored(
        self, seq: _Seq, first: int, registered: list[bool], events: list[KvEvent]
    ) -> None:
        """One ``BlockStored`` per contiguous run of newly registered blocks from ``first`` on."""
        run_start: int | None = None
        for i, ok in enumerate([*registered, False], start=first):
            if ok and run_start is None:
                run_start = i
            elif not ok and run_start is not None:
                events.append(self._stored_event(seq, run_start, i))
                run_start = None

    def _stored_event(self, seq: _Seq, start: int, end: int) -> BlockStored:
        bs = self.block_size
        parent = hash_to_int(seq.hashes[start - 1]) if start > 0 else None
        return BlockStored(
            block_hashes=[hash_to_int(h) for h in seq.hashes[start:end]],
            parent_block_hash=parent,
            token_ids=list(seq.token_ids[start * bs : end * bs]),
            block_size=bs,
        )

    def _emit(self, events: list[KvEvent]) -> None:
        if events and self._on_events is not None and self.enable_prefix_caching:
            self._on_events(events)
