"""Forged KV events (anyone who reaches NATS can publish them) neither blind the router nor
grow its index without bound: a huge sequence number does not make real batches stale,
events and load of worker ids discovery never showed are not indexed, a worker that left is
forgotten, and what one event or one worker may carry is bounded."""

from __future__ import annotations

import msgspec
import pytest

from dynamo_sdk.llm.kv.events import (
    MAX_BLOCKS_PER_EVENT,
    MAX_EVENTS_PER_BATCH,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    LoadMetrics,
    Tier,
    decode_batch,
    decode_load,
    encode,
)
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.indexer import STALE_WINDOW, KvIndexer
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig

BS = 4
PROMPT = list(range(40))  # 10 blocks
HASHES = block_hashes_int(PROMPT, BS)


def stored(hashes: list[int], medium: str | None = None) -> BlockStored:
    return BlockStored(hashes, None, [], BS, medium)


def batch(worker: int, seq: int, *events: object) -> KvEventBatch:
    return KvEventBatch(worker, seq, list(events))  # type: ignore[arg-type]


# -- sequence numbers ------------------------------------------------------------------------


def test_a_huge_sequence_number_does_not_make_real_batches_stale() -> None:
    index = KvIndexer()
    index.apply(batch(1, 1, AllBlocksCleared()))
    index.apply(batch(1, 2, stored(HASHES[:2])))
    index.apply(batch(1, 2**62, stored([0xBAD])))  # forged: far ahead of the real stream
    assert index.needs_resync(1)  # a gap: noted
    index.apply(batch(1, 3, stored(HASHES[2:6])))  # the real stream goes on
    index.apply(batch(1, 4, stored(HASHES[6:])))
    assert index.find_matches(HASHES) == {1: 10}
    assert index.regressions == 1 and index.stale == 0
    # repeats within the window are still repeats
    index.apply(batch(1, 4, BlockRemoved(HASHES)))
    index.apply(batch(1, 3, BlockRemoved(HASHES)))
    assert index.stale == 2 and index.find_matches(HASHES) == {1: 10}
    # the worker's next rebuild (a batch that starts with AllBlocksCleared) ends the resync
    index.apply(batch(1, 5, AllBlocksCleared(), stored(HASHES)))
    assert not index.needs_resync(1)
    assert index.find_matches(HASHES) == {1: 10} and index.blocks_of(1) == 10


def test_a_forged_first_batch_does_not_blind_the_index_either() -> None:
    index = KvIndexer()
    index.apply(batch(1, 2**63 - 1, stored([0xBAD])))  # before the worker's own first batch
    index.apply(batch(1, 1, AllBlocksCleared(), stored(HASHES)))
    assert index.find_matches(HASHES) == {1: 10} and index.blocks_of(1) == 10
    index.apply(batch(1, 2, BlockRemoved(HASHES[5:])))
    assert index.find_matches(HASHES) == {1: 5}


def test_the_stale_window_is_bounded() -> None:
    index = KvIndexer()
    index.apply(batch(1, STALE_WINDOW + 10, stored(HASHES[:1])))
    index.apply(batch(1, 11, stored(HASHES[1:2])))  # within the window: a repeat
    index.apply(batch(1, 9, stored(HASHES[1:2])))  # below it: applied
    assert index.stale == 1 and index.find_matches(HASHES) == {1: 2}


# -- workers discovery does not know ---------------------------------------------------------


def test_events_and_load_of_workers_not_in_discovery_are_not_indexed() -> None:
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    router.choose(PROMPT, [1, 2])  # the router now follows discovery: workers 1 and 2
    router.indexer.apply(batch(666, 1, stored(HASHES)))  # a worker id nobody registered
    router.update_load(LoadMetrics(666, 0.0, 0, 100, 0, 0))
    assert router.indexer.find_matches(HASHES) == {}
    assert 666 not in router.indexer.workers() and 666 not in router.load
    assert router.choose(PROMPT, [1, 2]).worker_id in (1, 2)
    # a live worker's events count as before
    router.indexer.apply(batch(2, 1, stored(HASHES)))
    router.update_load(LoadMetrics(2, 0.1, 10, 100, 1, 0))
    assert router.indexer.find_matches(HASHES) == {2: 10} and 2 in router.load


def test_early_events_of_a_worker_count_once_discovery_shows_it() -> None:
    """A new worker's first events can overtake the etcd watch that announces it: they are
    held, and applied when the worker appears among the live instances."""
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    router.choose(PROMPT, [1])
    router.indexer.apply(batch(7, 1, AllBlocksCleared(), stored(HASHES[:6])))
    router.indexer.apply(batch(7, 2, stored(HASHES[6:])))
    assert router.indexer.find_matches(HASHES) == {}
    decision = router.choose(PROMPT, [1, 7])
    assert decision.worker_id == 7 and decision.overlap_blocks == 10
    assert not router.indexer.needs_resync(7)


def test_held_events_of_unknown_workers_are_bounded() -> None:
    index = KvIndexer(pending_workers=8, pending_hashes=1000)
    index.admit([1])
    for worker in range(100, 10_100):  # 10,000 forged worker ids
        index.apply(batch(worker, 1, stored([worker, worker + 1])))
    assert len(index._pending) <= 8 and index._pending_cost <= 1000
    assert index.unknown_dropped >= 10_000 - 8
    for _ in range(50):  # one worker flooding: its oldest batches go, never the bound
        index.apply(batch(555, 1, stored(list(range(400)))))
    assert index._pending_cost <= 1000
    assert index.workers() == [] and index.num_blocks() == 0
    assert not index.is_known(555) and index.is_known(1)


def test_workers_indexed_before_the_router_followed_discovery_are_forgotten_if_not_live() -> None:
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    router.indexer.apply(batch(1, 1, stored(HASHES)))
    router.indexer.apply(batch(666, 1, stored(HASHES)))  # forged, before any decision
    router.update_load(LoadMetrics(666, 0.5, 50, 100, 3, 0))
    decision = router.choose(PROMPT, [1, 2])
    assert decision.worker_id == 1
    assert router.indexer.find_matches(HASHES) == {1: 10}
    assert router.indexer.workers() == [1] and 666 not in router.load


def test_a_worker_that_leaves_discovery_is_forgotten_and_stays_out() -> None:
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    router.choose(PROMPT, [1, 2])
    router.indexer.apply(batch(2, 1, stored(HASHES)))
    router.update_load(LoadMetrics(2, 0.1, 10, 100, 1, 0))
    router.remove_worker(2)  # its lease ended (what the feed does when etcd deletes its key)
    assert router.indexer.find_matches(HASHES) == {} and router.indexer.blocks_of(2) == 0
    assert 2 not in router.load
    router.indexer.apply(batch(2, 2, stored(HASHES)))  # late, or forged in its name
    router.update_load(LoadMetrics(2, 0.1, 10, 100, 1, 0))
    assert router.indexer.find_matches(HASHES) == {} and 2 not in router.load
    assert router.choose(PROMPT, [1]).worker_id == 1


def test_an_index_that_does_not_follow_discovery_takes_every_worker() -> None:
    """Without `admit` (benchmarks, tests, a router not yet asked), nothing is held."""
    index = KvIndexer()
    index.apply(batch(9, 1, stored(HASHES)))
    assert index.find_matches(HASHES) == {9: 10} and index.is_known(9)


# -- bounds ----------------------------------------------------------------------------------


def test_a_worker_cannot_grow_its_index_past_its_bound() -> None:
    index = KvIndexer(max_blocks_per_worker=100, max_shared_blocks=50)
    index.apply(batch(1, 1, stored(list(range(1000, 1150)))))
    assert index.blocks_of(1) == 100 and index.over_capacity == 50
    index.apply(batch(1, 2, stored(list(range(5000, 5100)), "CPU")))  # per tier
    index.apply(batch(2, 1, stored(list(range(2000, 2100)))))  # per worker
    assert index.num_blocks() == 200
    index.apply(batch(1, 3, stored(list(range(9000, 9080)), "SHARED")))
    assert index.num_blocks(Tier.SHARED) == 50
    index.apply(batch(1, 4, BlockRemoved(list(range(1000, 1150)))))  # room again
    index.apply(batch(1, 5, stored(list(range(3000, 3010)))))
    assert index.blocks_of(1) == 10


def encoded(worker: int, seq: int, events: list[object]) -> bytes:
    return msgspec.msgpack.encode({"worker_id": worker, "seq": seq, "events": events})


def test_decoding_bounds_what_a_batch_may_carry() -> None:
    good = encode(batch(1, 1, stored(HASHES)))
    assert decode_batch(good) == batch(1, 1, stored(HASHES))
    ok_event = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4],
        "block_size": 4,
    }
    too_many_blocks = {**ok_event, "block_hashes": list(range(MAX_BLOCKS_PER_EVENT + 1))}
    too_many_blocks["token_ids"] = []
    hostile: list[tuple[bytes, str]] = [
        (encoded(-1, 1, []), "worker_id"),
        (encoded(2**64 - 1, 1, []), "worker_id"),
        (encoded(1, 2**64 - 1, []), "seq"),
        (encoded(1, -5, []), "seq"),
        (encoded(1, 1, [{**ok_event, "block_size": 0}]), "block_size"),
        (encoded(1, 1, [{**ok_event, "block_size": 1 << 30}]), "block_size"),
        (encoded(1, 1, [{**ok_event, "token_ids": list(range(5))}]), "more tokens than"),
        (encoded(1, 1, [{**ok_event, "token_ids": [-1]}]), "token_ids"),
        (encoded(1, 1, [{**ok_event, "medium": "X" * 1000}]), "medium"),
        (encoded(1, 1, [too_many_blocks]), "block_hashes"),
        (encoded(1, 1, [{"type": "AllBlocksCleared"}] * (MAX_EVENTS_PER_BATCH + 1)), "events"),
        (encoded(1, 1, [{"type": "Exploit"}]), "Invalid value"),
    ]
    for data, why in hostile:
        with pytest.raises(msgspec.ValidationError, match=why):
            decode_batch(data)


def test_decoding_bounds_load_metrics() -> None:
    assert decode_load(encode(LoadMetrics(1, 0.5, 5, 10, 1, 0))).kv_usage == 0.5
    fields = {"worker_id": 1, "active_blocks": 0, "total_blocks": 1, "waiting": 0}
    for usage, running in ((float("nan"), 0), (2.0, 0), (-0.1, 0), (0.5, -1)):
        data = msgspec.msgpack.encode({**fields, "kv_usage": usage, "running": running})
        with pytest.raises(msgspec.ValidationError):
            decode_load(data)


def test_malformed_vllm_events_are_dropped_not_raised() -> None:
    from dynamo_sdk.llm.kv.events import from_vllm

    assert from_vllm({"type": "BlockStored"}) is None  # missing fields
    assert from_vllm({"type": "BlockRemoved", "block_hashes": "nope"}) is None
    too_many_tokens = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None}
    assert from_vllm({**too_many_tokens, "token_ids": [1] * 99, "block_size": 4}) is None
    assert from_vllm({"type": "AllBlocksCleared"}) == AllBlocksCleared()
