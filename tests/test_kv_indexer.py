"""KvIndexer: the global prefix index, by example and against a brute-force reference."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_sdk.llm.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
)
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.indexer import KvIndexer

A = block_hashes_int(list(range(80)), 16)  # 5 chained blocks
B = block_hashes_int(list(range(32)) + [7] * 48, 16)  # shares A's first 2 blocks


def stored(hashes: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(hashes, parent, [0] * (16 * len(hashes)), 16)


class Feeder:
    """Sends events as consecutive per-worker batches, like a well-behaved publisher."""

    def __init__(self, index: KvIndexer) -> None:
        self.index = index
        self.seq: dict[int, int] = {}

    def __call__(self, worker: int, *events: KvEvent) -> None:
        seq = self.seq.get(worker, -1) + 1
        self.seq[worker] = seq
        self.index.apply(KvEventBatch(worker, seq, list(events)))


def test_insert_and_overlap() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A[:3]))
    send(2, stored(A[:2]), stored(B[2:], parent=B[1]))
    assert index.find_matches(A) == {1: 3, 2: 2}
    assert index.find_matches(B) == {1: 2, 2: 5}
    assert index.find_matches(A[:1]) == {1: 1, 2: 1}
    assert index.find_matches([]) == {}
    assert index.find_matches([12345]) == {}
    assert index.num_blocks() == 3 + 3  # A0..A2 shared, plus B2..B4
    assert index.blocks_of(1) == 3 and index.blocks_of(2) == 5 and index.blocks_of(9) == 0


def test_match_must_start_at_block_zero_and_be_consecutive() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A[1:4], parent=A[0]))  # unknown parent: tolerated
    assert index.find_matches(A) == {}
    send(1, stored(A[:1]))
    assert index.find_matches(A) == {1: 4}
    send(1, BlockRemoved([A[2]]))
    assert index.find_matches(A) == {1: 2}


def test_remove_and_clear() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A))
    send(2, stored(A))
    send(1, BlockRemoved([A[4], A[3]]))
    assert index.find_matches(A) == {1: 3, 2: 5}
    send(1, BlockRemoved([A[4], 999]))  # not held: no-op
    assert index.blocks_of(1) == 3
    send(2, AllBlocksCleared())
    assert index.find_matches(A) == {1: 3}
    assert index.num_blocks() == 3
    send(1, AllBlocksCleared())
    assert index.num_blocks() == 0 and index.find_matches(A) == {}


def test_remove_worker_frees_its_slot() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A))
    send(2, stored(A[:2]))
    index.remove_worker(1)
    index.remove_worker(42)  # unknown: no-op
    assert index.find_matches(A) == {2: 2}
    assert index.workers() == [2]
    index.apply(KvEventBatch(3, 0, [stored(A[:1])]))  # reuses worker 1's slot
    assert index.find_matches(A) == {2: 2, 3: 1}
    assert index.num_blocks() == 2


def test_duplicates_are_idempotent_and_stale_batches_dropped() -> None:
    index = KvIndexer()
    index.apply(KvEventBatch(1, 10, [stored(A[:2])]))  # a worker may start at any seq
    index.apply(KvEventBatch(1, 10, [stored(A[:2])]))  # redelivered
    index.apply(KvEventBatch(1, 11, [stored(A[:2]), stored(A[:3])]))  # same hashes again
    assert index.find_matches(A) == {1: 3} and index.blocks_of(1) == 3
    index.apply(KvEventBatch(1, 12, [BlockRemoved([A[0]])]))
    index.apply(KvEventBatch(1, 11, [stored(A[:3])]))  # late: would resurrect A0
    assert index.find_matches(A) == {}
    assert index.stale == 2 and index.gaps == 0 and not index.needs_resync(1)


def test_seq_gap_is_counted_and_flagged(caplog: pytest.LogCaptureFixture) -> None:
    index = KvIndexer()
    index.apply(KvEventBatch(1, 0, [stored(A[:1])]))
    with caplog.at_level(logging.WARNING):
        index.apply(KvEventBatch(1, 2, [stored(A[1:2], parent=A[0])]))  # seq 1 lost
    assert "gap" in caplog.text
    assert index.gaps == 1 and index.needs_resync(1) and not index.needs_resync(2)
    assert index.find_matches(A) == {1: 2}  # still applied: best effort
    index.apply(KvEventBatch(1, 3, [AllBlocksCleared(), stored(A[:3])]))  # a full resync
    assert not index.needs_resync(1)
    assert index.find_matches(A) == {1: 3}
    index.apply(KvEventBatch(1, 9, []))
    index.remove_worker(1)
    assert not index.needs_resync(1)


def test_more_workers_than_a_machine_word() -> None:
    index = KvIndexer()
    for worker in range(100):
        index.apply(KvEventBatch(worker, 0, [stored(A[: 1 + worker % 5])]))
    assert index.find_matches(A) == {w: 1 + w % 5 for w in range(100)}


# -- property test against a brute-force reference ------------------------------------------

# A small hash universe with shared prefixes: every path of 1..5 binary tokens, chain-hashed
# with block size 1, so prefixes of paths share hashes exactly as prompts sharing a prefix do.
paths = st.lists(st.integers(0, 1), min_size=1, max_size=5)
workers = st.integers(0, 3)
event_st = st.one_of(
    st.tuples(st.just("store"), workers, paths, st.integers(0, 4)),
    st.tuples(st.just("remove"), workers, paths, st.integers(0, 4)),
    st.tuples(st.just("clear"), workers, st.just([0]), st.just(0)),
    st.tuples(st.just("leave"), workers, st.just([0]), st.just(0)),
)


def reference_matches(held: dict[int, set[int]], request: list[int]) -> dict[int, int]:
    scores = {}
    for worker, hashes in held.items():
        n = 0
        while n < len(request) and request[n] in hashes:
            n += 1
        if n:
            scores[worker] = n
    return scores


@settings(max_examples=300, deadline=None)
@given(st.lists(event_st, max_size=40), st.lists(paths, min_size=1, max_size=6))
def test_matches_brute_force_reference(
    ops: list[tuple[str, int, list[int], int]], queries: list[list[int]]
) -> None:
    index = KvIndexer()
    send = Feeder(index)
    held: dict[int, set[int]] = {}
    for op, worker, path, start in ops:
        hashes = block_hashes_int(path, 1)
        start = min(start, len(hashes) - 1)
        if op == "store":  # a suffix of the chain, parent possibly never stored
            parent = hashes[start - 1] if start else None
            send(worker, stored(hashes[start:], parent))
            held.setdefault(worker, set()).update(hashes[start:])
        elif op == "remove":
            send(worker, BlockRemoved(hashes[start:]))
            held.get(worker, set()).difference_update(hashes[start:])
        elif op == "clear":
            send(worker, AllBlocksCleared())
            held.pop(worker, None)
        else:
            index.remove_worker(worker)
            send.seq.pop(worker, None)
            held.pop(worker, None)
        for query in queries:
            request = block_hashes_int(query, 1)
            assert index.find_matches(request) == reference_matches(held, request)
    assert index.num_blocks() == len(set[int]().union(*held.values()))
    for worker, worker_hashes in held.items():
        assert index.blocks_of(worker) == len(worker_hashes)
    assert index.gaps == 0 and index.stale == 0
