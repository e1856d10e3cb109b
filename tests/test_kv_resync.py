"""A router's index rebuilt from worker snapshots (`dynamo_sdk/llm/kv/resync.py`): a router
that starts after the workers, and one that saw a gap in a worker's batches, end up with the
worker's real state. Real NATS and etcd; mocker engines with a host tier."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from dynamo_sdk.llm.engines.mocker import MockerEngine
from dynamo_sdk.llm.kv.events import (
    AllBlocksCleared,
    BlockStored,
    KvEvent,
    KvEventBatch,
    Tier,
    encode,
    kv_events_subject,
)
from dynamo_sdk.llm.kv.feed import KvFeed
from dynamo_sdk.llm.kv.indexer import KvIndexer
from dynamo_sdk.llm.kv.publisher import KvPublisher
from dynamo_sdk.llm.kv.resync import KvResyncRequest, decode_request, encode_request
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig
from dynamo_sdk.llm.kv.tiers.stack import HOST
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.conftest import settings_for
from tests.engine_requests import collect, make_request

BLOCK = 4


async def mocker(tmp_path: Path) -> MockerEngine:
    engine = MockerEngine(
        speedup=1000.0, num_blocks=16, block_size=BLOCK, context_length=32, host_kv_blocks=64
    )
    await engine.start()
    return engine


async def fill(engine: MockerEngine, n: int) -> None:
    """``n`` distinct 3-block prompts: the 16-block device cache keeps the last few, the host
    tier all of them."""
    for i in range(n):
        prompt = [1000 * (i + 1) + j for j in range(3 * BLOCK)]
        await collect(engine, make_request(prompt, 1, request_id=f"p{i}"))


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def state(indexer: KvIndexer, worker: int) -> tuple[int, int]:
    """The blocks the index believes ``worker`` holds on its device and in host memory."""
    return indexer.blocks_of(worker), indexer.blocks_of(worker, Tier.HOST)


async def test_a_snapshot_rebuilds_what_the_live_events_built(tmp_path: Path) -> None:
    engine = await mocker(tmp_path)
    live: list[KvEvent] = []
    engine.kv_events().subscribe(live.extend, replay=True)
    try:
        await fill(engine, 8)
        await asyncio.sleep(0.05)
        snapshot = engine.kv_snapshot()
    finally:
        await engine.shutdown()
    assert snapshot is not None and isinstance(snapshot[0], AllBlocksCleared)
    assert any(isinstance(e, BlockStored) and e.medium == HOST for e in snapshot)
    by_events, by_snapshot = KvIndexer(), KvIndexer()
    by_events.apply(KvEventBatch(worker_id=7, seq=1, events=live))
    by_snapshot.apply(KvEventBatch(worker_id=7, seq=1, events=snapshot))
    assert state(by_snapshot, 7) == state(by_events, 7) != (0, 0)


def test_resync_requests_are_typed() -> None:
    assert decode_request(encode_request(KvResyncRequest(5))) == KvResyncRequest(5)
    import msgspec
    import pytest

    for bad in (b"\x00", msgspec.msgpack.encode({"worker_id": -1}), b"\x92\x01\x02"):
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
            decode_request(bad)


async def test_a_router_started_late_and_one_that_saw_a_gap_get_snapshots(
    servers: EmbeddedServers, unique_ns: str, tmp_path: Path
) -> None:
    worker_rt = await DistributedRuntime.connect(settings_for(servers))
    router_rt = await DistributedRuntime.connect(settings_for(servers))
    engine = await mocker(tmp_path)
    publisher = KvPublisher(
        worker_rt, unique_ns, "Worker", engine.load_metrics, snapshot=engine.kv_snapshot,
        snapshot_interval=0.0,
    )  # fmt: skip
    engine.kv_events().subscribe(publisher.on_events, replay=True)
    feed: KvFeed | None = None
    try:
        await publisher.start()
        await fill(engine, 8)  # all of it published before any router listens
        wid = worker_rt.instance_id
        reference = KvIndexer()
        snapshot = engine.kv_snapshot()
        assert snapshot is not None
        reference.apply(KvEventBatch(worker_id=wid, seq=1, events=snapshot))
        expected = state(reference, wid)

        router = KvRouter(RouterConfig(mode="kv", block_size=BLOCK))
        feed = KvFeed(router, router_rt, unique_ns, "Worker")
        await feed.start(router_rt.watcher(unique_ns, "Worker", "generate"))
        await until(lambda: state(router.indexer, wid) == expected, 10, "the start snapshot")
        assert publisher.snapshots == 1

        # a batch lost on the way: the next one shows a gap, the router asks, the snapshot
        # brings the index back to the truth (here: a block it never heard of)
        publisher._seq += 1  # the lost batch
        await fill(engine, 9)  # one more prompt: published after the gap
        await until(lambda: publisher.snapshots == 2, 10, "a snapshot after the gap")
        await until(lambda: not router.indexer.needs_resync(wid), 10, "the rebuild")
        snapshot = engine.kv_snapshot()
        assert snapshot is not None
        truth = KvIndexer()
        truth.apply(KvEventBatch(worker_id=wid, seq=1, events=snapshot))
        await until(lambda: state(router.indexer, wid) == state(truth, wid), 10, "the truth")

        # a forged batch of blocks the worker never had is undone by the next snapshot
        forged = KvEventBatch(worker_id=wid, seq=10**6, events=[
            BlockStored(block_hashes=[123456789], parent_block_hash=None, token_ids=[],
                        block_size=BLOCK)])  # fmt: skip
        await router_rt.nc.publish(kv_events_subject(unique_ns, "Worker"), encode(forged))
        await until(lambda: publisher.snapshots == 3, 10, "a snapshot after the forged seq")
        await until(lambda: state(router.indexer, wid) == state(truth, wid), 10, "undone")
    finally:
        if feed is not None:
            await feed.stop()
        await publisher.stop()
        await engine.shutdown()
        for rt in (router_rt, worker_rt):
            await rt.shutdown()
