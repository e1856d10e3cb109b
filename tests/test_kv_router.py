"""The routing decision on its own: overlap credit, load, pending assignments, modes."""

from __future__ import annotations

import pytest

from dynamo_sdk.llm.kv.events import BlockStored, KvEventBatch, LoadMetrics
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig

BS = 4


def store(router: KvRouter, worker: int, tokens: list[int], seq: int = 1) -> None:
    hashes = block_hashes_int(tokens, BS)
    event = BlockStored(hashes, None, tokens[: len(hashes) * BS], BS)
    router.indexer.apply(KvEventBatch(worker, seq, [event]))


def load(worker: int, active: int) -> LoadMetrics:
    return LoadMetrics(worker, active / 100, active, 100, 0, 0)


def test_kv_mode_prefers_the_worker_holding_the_prefix() -> None:
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    prompt = list(range(40))
    store(router, 2, prompt[:32])
    decision = router.choose(prompt, [1, 2, 3])
    assert decision.worker_id == 2 and decision.overlap_blocks == 8 and decision.prompt_blocks == 10
    assert decision.costs[2] < decision.costs[1] == decision.costs[3]


def test_inflight_load_outweighs_a_small_overlap() -> None:
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    prompt = list(range(40))
    store(router, 2, prompt[:4])  # one block of overlap
    router.choose(list(range(100, 180)), [2], request_id="busy")  # 21 blocks in flight on 2
    assert router.choose(prompt, [1, 2], request_id="r").worker_id == 1
    router.release("busy")
    router.release("r")
    assert router.choose(prompt, [1, 2], request_id="r2").worker_id == 2


def test_inflight_assignments_spread_a_burst_and_release() -> None:
    """Identical requests arriving together must not all pile on one worker."""
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    prompt = list(range(64))
    chosen = [router.choose(prompt, [1, 2, 3], request_id=f"r{i}").worker_id for i in range(6)]
    assert sorted(set(chosen)) == [1, 2, 3]
    for i in range(6):
        router.release(f"r{i}")
    assert [router.inflight_blocks(w) for w in (1, 2, 3)] == [0, 0, 0]
    # a worker's prefix is worth going back to once it is not busy
    store(router, 3, prompt)
    assert router.choose(prompt, [1, 2, 3], request_id="again").worker_id == 3


def test_unreleased_assignments_clear_when_the_worker_reports_idle() -> None:
    router = KvRouter(RouterConfig(block_size=BS, leak_grace_s=1.0), seed=0)
    router.choose(list(range(40)), [1], request_id="lost", now=10.0)
    assert router.inflight_blocks(1) == 11
    router.update_load(load(1, 0), now=10.5)  # too soon: may not have started yet
    assert router.inflight_blocks(1) == 11
    router.update_load(load(1, 0), now=12.0)
    assert router.inflight_blocks(1) == 0


def test_modes_and_temperature() -> None:
    rr = KvRouter(RouterConfig(mode="round_robin", block_size=BS))
    assert [rr.choose([1, 2, 3, 4], [7, 5, 6]).worker_id for _ in range(4)] == [5, 6, 7, 5]
    rnd = KvRouter(RouterConfig(mode="random", block_size=BS), seed=1)
    assert {rnd.choose([1], [1, 2, 3]).worker_id for _ in range(50)} == {1, 2, 3}
    hot = KvRouter(RouterConfig(block_size=BS, temperature=10.0), seed=3)
    prompt = list(range(40))
    store(hot, 2, prompt)
    picks = []
    for i in range(200):
        picks.append(hot.choose(prompt, [1, 2], request_id=f"p{i}").worker_id)
        hot.release(f"p{i}")
    assert 0 < picks.count(1) < picks.count(2)  # sampled, still biased to the overlap
    with pytest.raises(ValueError, match="router mode"):
        RouterConfig(mode="kv-ish")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no workers"):
        rr.choose([1], [])


def test_removed_worker_leaves_index_and_load() -> None:
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    prompt = list(range(16))
    store(router, 9, prompt)
    router.update_load(load(9, 10))
    router.remove_worker(9)
    assert router.indexer.find_matches(block_hashes_int(prompt, BS)) == {}
    assert 9 not in router.load
