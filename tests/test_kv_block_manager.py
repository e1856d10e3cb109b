"""BlockManager: ref counting, prefix reuse, LRU eviction, and the KV events it publishes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_sdk.llm.kv.block_manager import BlockManager, NoFreeBlocksError
from dynamo_sdk.llm.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
)
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.indexer import KvIndexer

BS = 4


def make(num_blocks: int = 8, **kw: bool) -> tuple[BlockManager, list[list[KvEvent]]]:
    calls: list[list[KvEvent]] = []
    return BlockManager(num_blocks, BS, on_events=calls.append, **kw), calls


def test_allocate_and_free_ref_counts() -> None:
    bm, calls = make()
    alloc = bm.allocate("a", list(range(10)))
    assert len(alloc.block_ids) == 3 and alloc.num_cached_tokens == 0
    assert bm.block_table("a") == alloc.block_ids
    assert bm.num_tokens("a") == 10
    assert bm.num_active_blocks == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    assert calls == [
        [BlockStored(block_hashes_int(range(10), BS), None, list(range(8)), BS)]
    ]  # the partial third block is not hashed
    bm.check_invariants()
    bm.free("a")
    assert bm.num_active_blocks == 0 and bm.num_free_blocks == 8 and bm.usage == 0
    bm.check_invariants()
    with pytest.raises(KeyError):
        bm.block_table("a")


def test_second_identical_prompt_hits_prefix() -> None:
    bm, calls = make()
    prompt = list(range(10))
    first = bm.allocate("a", prompt)
    second = bm.allocate("b", prompt)  # while "a" still runs: blocks shared
    assert second.num_cached_tokens == 8
    assert second.block_ids[:2] == first.block_ids[:2]
    assert second.block_ids[2] != first.block_ids[2]
    assert len(calls) == 1  # nothing new was stored
    bm.free("a")
    bm.check_invariants()
    assert bm.num_active_blocks == 3  # two shared + b's own tail
    bm.free("b")
    third = bm.allocate("c", prompt)  # from the evictable cache
    assert third.num_cached_tokens == 8
    assert bm.stats() == (30, 16)
    bm.check_invariants()


def test_a_lookup_not_queried_leaves_the_hit_rate_alone() -> None:
    bm, _ = make()
    prompt = list(range(10))
    bm.allocate("a", prompt)
    bm.free("a")
    again = bm.allocate("a", prompt, query=False)  # a preempted sequence, re-admitted
    assert again.num_cached_tokens == 8
    assert bm.stats() == (10, 0)


def test_never_caches_the_whole_prompt() -> None:
    bm, calls = make()
    prompt = list(range(8))  # exactly two full blocks
    first = bm.allocate("a", prompt)
    bm.free("a")
    again = bm.allocate("b", prompt)
    assert again.num_cached_tokens == 4  # the last block is recomputed
    assert again.block_ids[0] == first.block_ids[0]
    assert again.block_ids[1] != first.block_ids[1]
    assert len(calls) == 1  # the recomputed block's hash is already cached: no new event
    bm.check_invariants()
    assert bm.allocate("c", [7]).num_cached_tokens == 0


def test_collision_is_verified_against_tokens() -> None:
    bm, _ = make()
    bm.allocate("a", list(range(9)))
    # Forge a hash collision: make block 0's registered tokens differ from the real ones.
    block = bm._blocks[bm.block_table("a")[0]]
    block.token_ids = (99, 99, 99, 99)
    assert bm.allocate("b", list(range(9))).num_cached_tokens == 0


def test_lru_eviction_order_and_removed_events() -> None:
    bm, calls = make(num_blocks=4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 0], [11, 12, 13, 14, 0]
    bm.allocate("a", a)
    bm.free("a")  # evictable, tail first: a1, a0 (a's partial block went to the free list)
    bm.allocate("b", b)
    bm.free("b")  # evictable: a1, a0, b0
    ha, hb = block_hashes_int(a, BS), block_hashes_int(b, BS)
    calls.clear()
    bm.allocate("c", [21, 22, 23, 24, 25, 26, 27, 28, 29])  # needs 3: 1 free + evict a1, a0
    assert calls[0][:2] == [BlockRemoved([ha[1]]), BlockRemoved([ha[0]])]
    assert isinstance(calls[0][2], BlockStored)
    bm.check_invariants()
    bm.free("c")
    # c's partial block went to the free list; then b0, used less recently than c's blocks.
    calls.clear()
    bm.allocate("d", [31, 32, 33, 34, 35])
    assert calls[0][0] == BlockRemoved([hb[0]])


def test_touching_a_cached_block_refreshes_its_lru_position() -> None:
    bm, calls = make(num_blocks=3)
    bm.allocate("a", [1, 2, 3, 4, 9])
    bm.free("a")
    bm.allocate("b", [5, 6, 7, 8, 9])
    bm.free("b")  # LRU: a0, b0
    bm.allocate("a2", [1, 2, 3, 4, 9])  # hit a0: now most recent
    bm.free("a2")  # LRU: b0, a0
    calls.clear()
    bm.allocate("c", [0, 0])  # the free block
    bm.allocate("d", [0, 0])  # evicts b0, not a0
    assert calls == [[BlockRemoved(block_hashes_int([5, 6, 7, 8], BS))]]


def test_no_free_blocks_leaves_state_unchanged() -> None:
    bm, calls = make(num_blocks=4)
    bm.allocate("a", list(range(8)))
    bm.free("a")  # 2 evictable + 2 free
    bm.allocate("b", [50])  # takes a free one
    before = (bm.num_free_blocks, bm.num_active_blocks, list(bm._evictable), len(calls))
    assert not bm.can_allocate(list(range(100, 116)))
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("c", list(range(100, 116)))  # needs 4, only 1 free + 2 evictable
    assert (bm.num_free_blocks, bm.num_active_blocks, list(bm._evictable), len(calls)) == before
    with pytest.raises(KeyError):
        bm.block_table("c")
    prompt = [*range(8), 1, 2, 3]
    assert bm.can_allocate(prompt)
    assert bm.allocate("c", prompt).num_cached_tokens == 8  # the cached prefix makes it fit
    assert bm.num_free_blocks == 0
    for t in (51, 52, 53):
        bm.append_token("b", t)  # fills b's block; no new block needed
    table = bm.block_table("b")
    with pytest.raises(NoFreeBlocksError):
        bm.append_token("b", 54)
    assert bm.num_tokens("b") == 4 and bm.block_table("b") == table
    bm.check_invariants()


def test_blocks_register_only_once_computed() -> None:
    bm, calls = make()
    prompt = [1, 2, 3, 4, 5, 6]
    bm.allocate("a", prompt)
    hashes = block_hashes_int([*prompt, 7, 8, 9, 10, 11, 12], BS)
    calls.clear()
    bm.append_token("a", 7)
    bm.append_token("a", 8)  # block 1 is full, but token 8's KV is not computed yet
    assert calls == []
    bm.mark_computed("a", 7)
    assert calls == []
    bm.mark_computed("a", 8)
    assert calls == [[BlockStored([hashes[1]], hashes[0], [5, 6, 7, 8], BS)]]
    bm.append_token("a", 9)  # crosses into a new block
    assert len(bm.block_table("a")) == 3 and bm.num_tokens("a") == 9
    for t in (10, 11, 12):
        bm.append_token("a", t)
    bm.mark_computed("a", 12)
    assert calls[-1] == [BlockStored([hashes[2]], hashes[1], [9, 10, 11, 12], BS)]
    bm.mark_computed("a", 5)  # never lowers the watermark
    assert bm.num_computed("a") == 12
    with pytest.raises(ValueError):
        bm.mark_computed("a", 13)
    bm.check_invariants()


def test_chunked_prefill_registers_chunk_by_chunk() -> None:
    bm, calls = make()
    prompt = list(range(13))
    hashes = block_hashes_int(prompt, BS)
    bm.allocate("a", prompt, num_computed=5)  # the first chunk: 5 tokens
    assert calls == [[BlockStored(hashes[:1], None, prompt[:4], BS)]]
    # Another request must not find blocks whose KV is still to be computed; computing the
    # whole prompt itself, it registers blocks 1-2 (the same hashes "a" will reach).
    assert bm.allocate("b", prompt).num_cached_tokens == 4
    assert calls[-1] == [BlockStored(hashes[1:], hashes[0], prompt[4:12], BS)]
    bm.mark_computed("a", 13)  # one physical block per hash: nothing new to announce
    assert len(calls) == 2
    bm.free("b")
    bm.check_invariants()
    bm.free("a")
    assert bm.allocate("c", prompt).num_cached_tokens == 12


def test_append_token_from_empty_block_boundary() -> None:
    bm, _ = make()
    bm.allocate("a", [1, 2, 3, 4])
    assert len(bm.block_table("a")) == 1
    bm.append_token("a", 5)
    assert len(bm.block_table("a")) == 2
    bm.check_invariants()


def test_clear_cache() -> None:
    bm, calls = make()
    bm.allocate("a", list(range(9)))
    bm.allocate("b", list(range(100, 109)))
    bm.free("a")
    calls.clear()
    bm.clear_cache()
    assert calls == [[BlockRemoved(block_hashes_int(range(9), BS)[::-1])]]  # LRU order
    assert bm.allocate("a", list(range(9))).num_cached_tokens == 0
    bm.free("a")
    bm.free("b")
    calls.clear()
    bm.clear_cache()
    assert calls == [[AllBlocksCleared()]]
    assert bm.num_free_blocks == 8 and not bm._by_hash
    bm.check_invariants()


def test_prefix_caching_disabled() -> None:
    bm, calls = make(enable_prefix_caching=False)
    bm.allocate("a", list(range(9)))
    bm.free("a")
    assert bm.allocate("b", list(range(9))).num_cached_tokens == 0
    for t in range(4):
        bm.append_token("b", t)
    bm.check_invariants()
    bm.free("b")
    bm.clear_cache()
    assert calls == []
    bm.check_invariants()


ops = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "append", "computed", "free", "clear"]),
        st.integers(0, 5),  # sequence slot
        st.lists(st.integers(0, 2), min_size=1, max_size=14),  # tiny vocab: many shared prefixes
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(3, 10))
def test_random_operations_keep_invariants_and_events_consistent(
    operations: list[tuple[str, int, list[int]]], num_blocks: int
) -> None:
    """Whatever happens, the events replayed into an indexer describe exactly the cached set."""
    indexer = KvIndexer()
    seq = iter(range(1_000_000))

    def publish(events: list[KvEvent]) -> None:
        indexer.apply(KvEventBatch(worker_id=7, seq=next(seq), events=events))

    bm = BlockManager(num_blocks, BS, on_events=publish)
    live: set[str] = set()
    for op, slot, tokens in operations:
        sid = f"s{slot}"
        try:
            if op == "alloc" and sid not in live:
                alloc = bm.allocate(sid, tokens)
                assert alloc.num_cached_tokens < len(tokens)
                assert alloc.num_cached_tokens % BS == 0
                live.add(sid)
            elif op == "append" and sid in live:
                bm.append_token(sid, tokens[0])
            elif op == "computed" and sid in live:
                bm.mark_computed(sid, bm.num_tokens(sid))
            elif op == "free" and sid in live:
                bm.free(sid)
                live.discard(sid)
            elif op == "clear":
                bm.clear_cache()
        except NoFreeBlocksError:
            pass
        bm.check_invariants()
        assert indexer.blocks_of(7) == len(bm._by_hash)
        cached = {k & (2**64 - 1) for k in map(_to_int, bm._by_hash)}
        assert set(indexer._held.get(7, ())) == cached
        assert bm.num_free_blocks + bm.num_active_blocks == num_blocks


def _to_int(h: bytes) -> int:
    return int.from_bytes(h, "big")
