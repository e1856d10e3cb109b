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


def test_load_outweighs_a_small_overlap() -> None:
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    prompt = list(range(40))
    store(router, 2, prompt[:4])  # one block of overlap
    router.update_load(load(1, 0))
    router.update_load(load(2, 50))  # but worker 2 is busy
    assert router.choose(prompt, [1, 2]).worker_id == 1


def test_pending_assignments_spread_a_burst() -> None:
    """Identical requests arriving together must not all pile on one worker."""
    router = KvRouter(RouterConfig(block_size=BS), seed=0)
    prompt = list(range(64))
    chosen = [router.choose(prompt, [1, 2, 3], now=100.0).worker_id for _ in range(6)]
    assert sorted(set(chosen)) == [1, 2, 3]
    # fresh metrics from a worker replace what the router assumed it had sent there
    router.update_load(load(1, 0), now=101.0)
    assert router._decode_load(1, 101.0) == 0


def test_modes_and_temperature() -> None:
    rr = KvRouter(RouterConfig(mode="round_robin", block_size=BS))
    assert [rr.choose([1, 2, 3, 4], [7, 5, 6]).worker_id for _ in range(4)] == [5, 6, 7, 5]
    rnd = KvRouter(RouterConfig(mode="random", block_size=BS), seed=1)
    assert {rnd.choose([1], [1, 2, 3]).worker_id for _ in range(50)} == {1, 2, 3}
    hot = KvRouter(RouterConfig(block_size=BS, temperature=10.0), seed=3)
    prompt = list(range(40))
    store(hot, 2, prompt)
    picks = [hot.choose(prompt, [1, 2], now=0.0).worker_id for _ in range(200)]
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
