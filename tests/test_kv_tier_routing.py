"""Tier-aware KV routing: events that say where a block lives (``medium``), the index's
per-tier residency, and the router crediting host/disk/shared blocks below a GPU hit."""

from __future__ import annotations

import logging
import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_sdk.llm.kv.events import (
    MEDIUM_DEVICE,
    MEDIUM_DISK,
    MEDIUM_HOST,
    MEDIUM_SHARED,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
    Tier,
    decode_batch,
    encode,
    from_vllm,
    tier_of,
)
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.kv.indexer import KvIndexer, TierOverlap
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig
from dynamo_sdk.llm.routing import RouteDecision, RouterState, RoutingConfig, router_config
from dynamo_sdk.llm.services.router import RouterServiceConfig

BS = 4
A = block_hashes_int(list(range(40)), BS)  # 10 chained blocks


def stored(hashes: list[int], medium: str | None = None) -> BlockStored:
    return BlockStored(hashes, None, [0] * (BS * len(hashes)), BS, medium)


class Feeder:
    """Sends events as consecutive per-worker batches, like a well-behaved publisher."""

    def __init__(self, index: KvIndexer) -> None:
        self.index = index
        self.seq: dict[int, int] = {}

    def __call__(self, worker: int, *events: KvEvent) -> None:
        seq = self.seq.get(worker, -1) + 1
        self.seq[worker] = seq
        self.index.apply(KvEventBatch(worker, seq, list(events)))


# -- events ---------------------------------------------------------------------------------


def test_events_with_a_medium_round_trip() -> None:
    batch = KvEventBatch(
        7,
        3,
        [
            stored(A[:2]),
            stored(A[2:4], MEDIUM_HOST),
            BlockRemoved(A[:1], MEDIUM_DISK),
            BlockRemoved(A[1:2]),
            AllBlocksCleared(MEDIUM_SHARED),
            AllBlocksCleared(),
        ],
    )
    assert decode_batch(encode(batch)) == batch


class _OldBlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


class _OldBlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[int]


class _OldAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class _OldBatch(msgspec.Struct):
    worker_id: int
    seq: int
    events: list[_OldBlockStored | _OldBlockRemoved | _OldAllBlocksCleared]


def test_a_batch_encoded_before_tiers_still_decodes_and_device_events_encode_as_before() -> None:
    old = _OldBatch(
        1, 2, [_OldAllBlocksCleared(), _OldBlockStored([5, 6], None, [1], 4), _OldBlockRemoved([5])]
    )
    new = KvEventBatch(
        1, 2, [AllBlocksCleared(), BlockStored([5, 6], None, [1], 4), BlockRemoved([5])]
    )
    assert decode_batch(msgspec.msgpack.encode(old)) == new
    # a device event leaves `medium` off the wire: byte for byte what an old sender sent, so a
    # router that predates tiers reads new workers' GPU events unchanged
    assert encode(new) == msgspec.msgpack.encode(old)
    # and a router that predates tiers ignores the field (it would count the block as GPU)
    host = KvEventBatch(1, 3, [stored([5], MEDIUM_HOST)])
    assert msgspec.msgpack.decode(encode(host), type=_OldBatch).events == [
        _OldBlockStored([5], None, [0] * BS, BS)
    ]


def test_tier_of_spellings() -> None:
    assert [tier_of(m) for m in (None, MEDIUM_DEVICE, "gpu", "cuda", "cuda:1")] == [Tier.DEVICE] * 5
    assert [tier_of(m) for m in (MEDIUM_HOST, "cpu", "host", "Host")] == [Tier.HOST] * 4
    assert [tier_of(m) for m in (MEDIUM_DISK, "disk", "SSD", "STORAGE")] == [Tier.DISK] * 4
    assert [tier_of(m) for m in (MEDIUM_SHARED, "remote", "REMOTE")] == [Tier.SHARED] * 3


def test_an_unknown_medium_counts_as_disk_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dynamo_sdk.llm.kv.events"):
        assert tier_of("tape-robot-7") is Tier.DISK
    assert "tape-robot-7" in caplog.text


def test_from_vllm_reads_the_medium() -> None:
    raw = {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": 10,
        "token_ids": [1, 2, 3, 4],
        "block_size": 2,
        "lora_id": None,
        "medium": "CPU",
    }
    assert from_vllm(raw) == BlockStored([11, 12], 10, [1, 2, 3, 4], 2, MEDIUM_HOST)
    assert from_vllm({**raw, "medium": "GPU"}) == BlockStored([11, 12], 10, [1, 2, 3, 4], 2)
    assert from_vllm({k: v for k, v in raw.items() if k != "medium"}) == BlockStored(
        [11, 12], 10, [1, 2, 3, 4], 2
    )  # a vLLM without offloading tiers
    removed = {"type": "BlockRemoved", "block_hashes": [11], "medium": "cpu"}
    assert from_vllm(removed) == BlockRemoved([11], MEDIUM_HOST)
    storage = {**removed, "medium": "STORAGE"}
    assert from_vllm(storage) == BlockRemoved([11], MEDIUM_DISK)
    assert from_vllm({**storage, "locality": "LOCAL"}) == BlockRemoved([11], MEDIUM_DISK)
    assert from_vllm({**storage, "locality": "REMOTE"}) == BlockRemoved([11], MEDIUM_SHARED)
    assert from_vllm({**removed, "medium": "weird"}) == BlockRemoved([11], "weird")
    assert from_vllm({"type": "AllBlocksCleared"}) == AllBlocksCleared()


def test_from_vllm_reads_vllms_own_offloading_events() -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    event = kv_events.BlockStored(
        block_hashes=[21, 22],
        parent_block_hash=None,
        token_ids=[1, 2, 3, 4],
        block_size=2,
        lora_id=None,
        medium=kv_events.MEDIUM_CPU,
        lora_name=None,
    )
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(event))
    assert from_vllm(raw) == BlockStored([21, 22], None, [1, 2, 3, 4], 2, MEDIUM_HOST)
    removed = kv_events.BlockRemoved(block_hashes=[21], medium=kv_events.MEDIUM_GPU)
    assert from_vllm(msgspec.msgpack.decode(msgspec.msgpack.encode(removed))) == BlockRemoved([21])


# -- the index --------------------------------------------------------------------------------


def test_per_tier_residency() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A[:3], MEDIUM_HOST))
    assert index.find_matches(A) == {}  # the device-only query does not see host blocks
    assert index.find_tiered_matches(A, [1, 2]) == {1: TierOverlap(host=3)}
    assert index.blocks_of(1, Tier.HOST) == 3 and index.blocks_of(1) == 0
    assert index.num_blocks(Tier.HOST) == 3 and index.num_blocks() == 0
    send(1, stored(A[:2]))  # the first two also on the GPU: they count as device hits
    assert index.find_tiered_matches(A, [1]) == {1: TierOverlap(device=2, host=1)}
    assert index.find_matches(A) == {1: 2}
    send(1, BlockRemoved(A[:3], MEDIUM_HOST))  # offloaded copies dropped, GPU copies stay
    assert index.find_tiered_matches(A, [1]) == {1: TierOverlap(device=2)}
    assert index.num_blocks(Tier.HOST) == 0 and index.blocks_of(1, Tier.HOST) == 0
    send(1, BlockRemoved(A[:1]))  # block 0 gone from the GPU: nothing leads any more
    assert index.find_tiered_matches(A, [1]) == {}
    send(1, stored(A[:4], MEDIUM_DISK), stored(A[:1], "cpu"))  # block 1 is still on the GPU
    assert index.find_tiered_matches(A, [1]) == {1: TierOverlap(device=1, host=1, disk=2)}
    assert index.blocks_of(1, Tier.DISK) == 4 and index.num_blocks(Tier.DISK) == 4


def test_shared_blocks_are_available_to_every_worker() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A[:4], MEDIUM_SHARED), stored(A[:2]))
    # worker 1 has its own copies of blocks 0-1; 2 stored nothing, 3 is unknown to the index
    send(2, stored(block_hashes_int([9] * 8, BS)))
    assert index.find_tiered_matches(A, [1, 2, 3]) == {
        1: TierOverlap(device=2, shared=2),
        2: TierOverlap(shared=4),
        3: TierOverlap(shared=4),
    }
    assert index.find_tiered_matches(A, [3]) == {3: TierOverlap(shared=4)}
    assert index.num_blocks(Tier.SHARED) == 4 and index.blocks_of(3, Tier.SHARED) == 4
    index.remove_worker(1)  # its GPU blocks go, what it put in shared storage stays
    assert index.find_tiered_matches(A, [1, 2]) == {
        1: TierOverlap(shared=4),
        2: TierOverlap(shared=4),
    }
    send(2, BlockRemoved(A[2:3], MEDIUM_SHARED))  # one copy in shared storage: anyone removes it
    assert index.find_tiered_matches(A, [2]) == {2: TierOverlap(shared=2)}
    send(2, AllBlocksCleared(MEDIUM_SHARED))  # the shared storage was wiped
    assert index.find_tiered_matches(A, [2]) == {} and index.num_blocks(Tier.SHARED) == 0


def test_all_blocks_cleared_clears_only_its_tier() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A[:5]), stored(A[:3], MEDIUM_HOST), stored(A[:8], MEDIUM_DISK))
    send(2, stored(A[:6]))
    send(1, AllBlocksCleared())  # vLLM reset its GPU prefix cache; offloaded copies remain
    assert index.find_tiered_matches(A, [1, 2]) == {
        1: TierOverlap(host=3, disk=5),
        2: TierOverlap(device=6),
    }
    send(1, AllBlocksCleared(MEDIUM_HOST))
    assert index.find_tiered_matches(A, [1]) == {1: TierOverlap(disk=8)}
    index.remove_worker(1)
    assert index.find_tiered_matches(A, [1, 2]) == {2: TierOverlap(device=6)}
    assert index.num_blocks(Tier.DISK) == 0 and index.blocks_of(1, Tier.DISK) == 0


def test_only_a_device_clear_ends_a_resync() -> None:
    index = KvIndexer()
    index.apply(KvEventBatch(1, 0, [stored(A[:2])]))
    index.apply(KvEventBatch(1, 5, [stored(A[2:3])]))  # a gap
    assert index.needs_resync(1)
    index.apply(KvEventBatch(1, 6, [AllBlocksCleared(MEDIUM_HOST), stored(A[:1])]))
    assert index.needs_resync(1)  # only the host tier was rebuilt
    index.apply(KvEventBatch(1, 7, [AllBlocksCleared(MEDIUM_DEVICE), stored(A[:1])]))
    assert not index.needs_resync(1)


def test_tiered_walk_over_mixed_tiers_and_gaps() -> None:
    index = KvIndexer()
    send = Feeder(index)
    # worker 1: GPU 0-1, host 2-3, GPU 4, disk 5, nothing at 6, disk 7-9
    send(1, stored(A[:2]), stored(A[2:4], MEDIUM_HOST), stored(A[4:5]))
    send(1, stored(A[5:6], MEDIUM_DISK), stored(A[7:], MEDIUM_DISK))
    # worker 2: host 0-9 with GPU copies of 0-2
    send(2, stored(A, MEDIUM_HOST), stored(A[:3]))
    # worker 3: disk 0, then a gap at 1
    send(3, stored(A[:1], MEDIUM_DISK), stored(A[2:], MEDIUM_HOST))
    assert index.find_tiered_matches(A, [1, 2, 3, 4]) == {
        1: TierOverlap(device=3, host=2, disk=1),
        2: TierOverlap(device=3, host=7),
        3: TierOverlap(disk=1),
    }
    # shared storage holding block 6 bridges worker 1's gap; worker 3's is at block 1
    send(4, stored(A[6:7], MEDIUM_SHARED))
    assert index.find_tiered_matches(A, [1, 3])[1] == TierOverlap(
        device=3, host=2, disk=4, shared=1
    )
    assert index.find_tiered_matches(A[:5], [1, 2]) == {
        1: TierOverlap(device=3, host=2),
        2: TierOverlap(device=3, host=2),
    }
    assert index.find_tiered_matches([], [1, 2]) == {}
    assert index.find_tiered_matches([12345, *A], [1, 2]) == {}
    assert index.find_tiered_matches(A, []) == {}


def test_tiered_matches_without_lower_tiers_are_the_device_matches() -> None:
    index = KvIndexer()
    send = Feeder(index)
    send(1, stored(A[:3]))
    send(2, stored(A[:7]))
    assert index.find_tiered_matches(A, [1, 2, 3]) == {1: TierOverlap(3), 2: TierOverlap(7)}
    assert index.find_tiered_matches(A, {2}) == {2: TierOverlap(7)}  # only the workers asked


# -- the tiered walk against a brute-force reference ----------------------------------------

TIERS = (MEDIUM_DEVICE, MEDIUM_HOST, MEDIUM_DISK, MEDIUM_SHARED)
paths = st.lists(st.integers(0, 1), min_size=1, max_size=5)
op_st = st.tuples(
    st.sampled_from(["store", "remove", "clear", "leave"]),
    st.integers(0, 3),  # worker
    st.sampled_from([None, *TIERS]),
    paths,
    st.integers(0, 4),  # where in the chain the event starts
)


def reference(
    held: dict[tuple[int, Tier], set[int]], shared: set[int], request: list[int], workers: list[int]
) -> dict[int, TierOverlap]:
    out = {}
    for w in workers:
        counts = [0, 0, 0, 0]
        for h in request:
            tiers = [t for t in (Tier.DEVICE, Tier.HOST, Tier.DISK) if h in held.get((w, t), ())]
            if tiers:
                counts[tiers[0]] += 1
            elif h in shared:
                counts[Tier.SHARED] += 1
            else:
                break
        if any(counts):
            out[w] = TierOverlap(*counts)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=40), st.lists(paths, min_size=1, max_size=6))
def test_tiered_matches_brute_force_reference(
    ops: list[tuple[str, int, str | None, list[int], int]], queries: list[list[int]]
) -> None:
    index = KvIndexer()
    send = Feeder(index)
    held: dict[tuple[int, Tier], set[int]] = {}
    shared: set[int] = set()
    for op, worker, medium, path, start in ops:
        tier = tier_of(medium)
        hashes = block_hashes_int(path, 1)
        hashes = hashes[min(start, len(hashes) - 1) :]
        if op == "store":
            send(worker, BlockStored(hashes, None, [], 1, medium))
            (shared if tier is Tier.SHARED else held.setdefault((worker, tier), set())).update(
                hashes
            )
        elif op == "remove":
            send(worker, BlockRemoved(hashes, medium))
            (shared if tier is Tier.SHARED else held.get((worker, tier), set())).difference_update(
                hashes
            )
        elif op == "clear":
            send(worker, AllBlocksCleared(medium))
            if tier is Tier.SHARED:
                shared.clear()
            else:
                held.pop((worker, tier), None)
        else:
            index.remove_worker(worker)
            send.seq.pop(worker, None)
            for t in (Tier.DEVICE, Tier.HOST, Tier.DISK):
                held.pop((worker, t), None)
        for query in queries:
            request = block_hashes_int(query, 1)
            assert index.find_tiered_matches(request, range(5)) == reference(
                held, shared, request, list(range(5))
            )
            device: dict[tuple[int, Tier], set[int]] = {
                key: hs for key, hs in held.items() if key[1] is Tier.DEVICE
            }
            assert index.find_matches(request) == {
                w: o.device for w, o in reference(device, set(), request, list(range(5))).items()
            }
    for (w, t), hs in held.items():
        assert index.blocks_of(w, t) == len(hs)
    for t in (Tier.DEVICE, Tier.HOST, Tier.DISK):
        assert index.num_blocks(t) == len(
            set[int]().union(*(hs for (_, u), hs in held.items() if u is t))
        )
    assert index.num_blocks(Tier.SHARED) == len(shared)


# -- the router -------------------------------------------------------------------------------


def router_with(config: RouterConfig, *events: tuple[int, BlockStored]) -> KvRouter:
    router = KvRouter(config, seed=0)
    send = Feeder(router.indexer)
    for worker, event in events:
        send(worker, event)
    return router


PROMPT = list(range(40))  # the 10 blocks of A
HOST_10 = (1, stored(A, MEDIUM_HOST))  # worker 1: all 10 blocks in host memory
DEVICE_4 = (2, stored(A[:4]))  # worker 2: the first 4 on its GPU


def test_host_weight_decides_between_many_host_blocks_and_few_gpu_blocks() -> None:
    router = router_with(RouterConfig(block_size=BS), HOST_10, DEVICE_4)
    decision = router.choose(PROMPT, [1, 2])
    assert decision.worker_id == 1  # 10 * 0.75 = 7.5 blocks credited beat 4
    assert decision.costs == {1: 2.5, 2: 6.0}
    assert decision.tiers == TierOverlap(host=10) and decision.overlap_blocks == 0
    assert router.inflight_blocks(1) == 3  # prefill work: 10 - round(0.75 * 10 host) + 1 decode

    router = router_with(RouterConfig(block_size=BS, host_weight=0.3), HOST_10, DEVICE_4)
    decision = router.choose(PROMPT, [1, 2])
    assert decision.worker_id == 2  # 10 * 0.3 = 3 < 4
    assert decision.tiers == TierOverlap(device=4) and decision.overlap_blocks == 4
    assert router.inflight_blocks(2) == 7  # 10 - 4 on the GPU + 1


def test_disk_weight_and_the_gpu_only_router() -> None:
    disk_10 = (1, stored(A, MEDIUM_DISK))
    router = router_with(RouterConfig(block_size=BS), disk_10, DEVICE_4)
    assert router.choose(PROMPT, [1, 2]).worker_id == 2  # 10 * 0.25 = 2.5 < 4
    router = router_with(RouterConfig(block_size=BS, disk_weight=0.5), disk_10, DEVICE_4)
    assert router.choose(PROMPT, [1, 2]).worker_id == 1  # 5 > 4
    blind = router_with(RouterConfig(block_size=BS, tier_aware=False), HOST_10, DEVICE_4)
    decision = blind.choose(PROMPT, [1, 2])
    assert decision.worker_id == 2 and decision.costs == {1: 10.0, 2: 6.0}
    assert decision.tiers is None and decision.overlap_blocks == 4


def test_shared_blocks_credit_every_worker_equally() -> None:
    router = router_with(RouterConfig(block_size=BS), (3, stored(A, MEDIUM_SHARED)))
    decision = router.choose(PROMPT, [1, 2, 3])
    assert decision.costs == {1: 7.5, 2: 7.5, 3: 7.5}  # 10 - 10 * 0.25 each
    assert decision.tiers == TierOverlap(shared=10)
    # load breaks the tie: the next identical request goes elsewhere
    assert router.choose(PROMPT, [1, 2, 3]).worker_id != decision.worker_id
    # a GPU copy of the first blocks on top of shared storage tips the balance
    router = router_with(
        RouterConfig(block_size=BS), (3, stored(A, MEDIUM_SHARED)), (2, stored(A[:2]))
    )
    decision = router.choose(PROMPT, [1, 2, 3])
    assert decision.worker_id == 2 and decision.tiers == TierOverlap(device=2, shared=8)
    assert decision.costs[2] == 10 - 2 - 8 * 0.25 and decision.costs[1] == decision.costs[3] == 7.5


def test_without_lower_tiers_the_costs_are_those_of_the_gpu_only_router() -> None:
    events = ((1, stored(A[:3])), (2, stored(A[:7])))
    aware = router_with(RouterConfig(block_size=BS), *events).choose(PROMPT, [1, 2, 3])
    blind = router_with(RouterConfig(block_size=BS, tier_aware=False), *events).choose(
        PROMPT, [1, 2, 3]
    )
    assert aware.costs == blind.costs == {1: 7.0, 2: 3.0, 3: 10.0}
    assert aware.worker_id == blind.worker_id == 2 and aware.tiers == TierOverlap(device=7)


@pytest.mark.parametrize("name", ["host_weight", "disk_weight", "shared_weight"])
@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_tier_weights_must_be_between_0_and_1(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be between 0 and 1"):
        RouterConfig(**{name: value})  # type: ignore[arg-type]


def test_tier_weights_at_the_bounds_are_accepted() -> None:
    RouterConfig(host_weight=0.0, disk_weight=1.0, shared_weight=0.0)


# -- configuration ----------------------------------------------------------------------------


def test_the_routing_keys_reach_the_router_config() -> None:
    keys = {
        "router_mode": "kv",
        "kv_tier_host_weight": 0.5,
        "kv_tier_disk_weight": 0.1,
        "kv_tier_shared_weight": 0.2,
        "kv_tier_aware": False,
    }
    config = router_config(msgspec.convert(keys, RoutingConfig), block_size=32)
    assert (config.host_weight, config.disk_weight, config.shared_weight) == (0.5, 0.1, 0.2)
    assert not config.tier_aware and config.block_size == 32 and config.mode == "kv"
    defaults = router_config(RoutingConfig(), block_size=16)
    assert (defaults.host_weight, defaults.disk_weight, defaults.shared_weight) == (
        0.75,
        0.25,
        0.25,
    )
    assert defaults.tier_aware
    with pytest.raises(msgspec.ValidationError, match=r"<= 1\.0"):
        msgspec.convert({"kv_tier_host_weight": 2.0}, RoutingConfig)
    service = msgspec.convert({"host_weight": 0.6, "tier_aware": False}, RouterServiceConfig)
    assert service.host_weight == 0.6 and not service.tier_aware and service.disk_weight == 0.25
    with pytest.raises(msgspec.ValidationError, match=r">= 0\.0"):
        msgspec.convert({"shared_weight": -1}, RouterServiceConfig)


def test_wire_types_stay_compatible() -> None:
    old = msgspec.msgpack.encode({"worker_id": 1, "overlap_blocks": 2, "prompt_blocks": 3})
    assert msgspec.msgpack.decode(old, type=RouteDecision) == RouteDecision(1, 2, 3, 0, 0, 0)
    old = msgspec.msgpack.encode({"mode": "kv", "workers": {}, "indexed_blocks": 3})
    assert msgspec.msgpack.decode(old, type=RouterState).tier_blocks == {}
