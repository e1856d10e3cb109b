"""KV tiers on `engine: vllm`: vLLM's OffloadingConnector with our spec and stores (CPU build).

A device cache of a few blocks, a prompt, other prompts that evict it, the prompt again: it
comes back from host memory (`cached_tokens` > 0) and greedy decoding gives the same tokens.
With a disk tier, a second engine on the same folder (host memory empty) gets it from disk.
The disk and shared tiers report what they moved as the torch engine's do, and a load slower
than ``kv_load_timeout_s`` is recomputed instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dynamo_sdk.llm.engines.base import EngineConfigError
from dynamo_sdk.llm.engines.configs import VllmConfig, settings
from dynamo_sdk.llm.engines.vllm_engine import VllmEngine, vllm_block_bytes
from dynamo_sdk.llm.kv.events import BlockStored, KvEvent
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats
from dynamo_sdk.llm.protocol import (
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_sdk.llm.testing.tiny_model import build_tiny_model
from tests.engine_requests import collect, tokens

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]

# vLLM's CPU platform uses 128-token blocks: 8 device blocks hold two of these prompts
ENGINE_ARGS = {
    "enforce_eager": True,
    "max_model_len": 512,
    "dtype": "float32",
    "num_gpu_blocks_override": 8,
}
rng = random.Random(0)
PROMPT = [rng.randrange(10, 2000) for _ in range(400)]
FILLERS = [[rng.randrange(10, 2000) for _ in range(400)] for _ in range(5)]


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(build_tiny_model())


@pytest.fixture(autouse=True)
def _kv_cache_space(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would take most RAM


def request(request_id: str, token_ids: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=request_id,
        model="tiny",
        token_ids=token_ids,
        stop=StopConditions(max_tokens=4),
        sampling=SamplingOptions(temperature=0.0),
    )


def config(**knobs: object) -> VllmConfig:
    return settings(VllmConfig, {"engine_args": ENGINE_ARGS, **knobs})


async def run(engine: VllmEngine, request_id: str, token_ids: list[int]) -> tuple[int, list[int]]:
    # bounded: a load that never ends (or is retried forever) fails the test, not hangs it
    outs = await asyncio.wait_for(collect(engine, request(request_id, token_ids)), 120)
    return outs[0].cached_tokens or 0, tokens(outs)


async def evict(engine: VllmEngine, tag: str) -> None:
    for i, filler in enumerate(FILLERS):
        cached, _ = await run(engine, f"{tag}-filler-{i}", filler)
        assert cached == 0


def served(tier: KvTierStats) -> bool:
    return tier.hit_tokens > 0


async def run_fresh(
    model_path: str,
    tiers: dict[str, object],
    request_id: str,
    medium: str = "",
    ready: Callable[[KvTierStats], bool] = served,
) -> tuple[int, list[int], KvTierStats | None]:
    """A new engine with ``tiers`` answers PROMPT once and shuts down (its writes to the tiers
    below finish first): (cached tokens, answer, the stats of its tier ``medium`` once
    ``ready`` holds for them: by default, once it served tokens)."""
    engine = VllmEngine(model_path, config(**tiers))
    await engine.start()
    try:
        cached, answer = await run(engine, request_id, PROMPT)
        return cached, answer, (await tier_stats(engine, medium, ready) if medium else None)
    finally:
        await engine.shutdown()


async def tier_stats(
    engine: VllmEngine, medium: str, ready: Callable[[KvTierStats], bool] = served
) -> KvTierStats:
    """``medium``'s stats once ``ready`` holds for them (or after 10 s, as they are then):
    stats arrive with vLLM's step outputs, and a tier's writes end after the request."""
    for _ in range(100):
        tier = {t.medium: t for t in engine.stats().kv_tiers}[medium]
        if ready(tier):
            break
        await asyncio.sleep(0.1)
    return tier


async def tier_hits(engine: VllmEngine, medium: str) -> int:
    return (await tier_stats(engine, medium)).hit_tokens


async def test_host_tier_brings_back_an_evicted_prompt(model_path: str) -> None:
    engine = VllmEngine(model_path, config(host_kv_blocks=32, kv_events=True))
    events: list[KvEvent] = []
    fanout = engine.kv_events()
    assert fanout is not None
    fanout.subscribe(events.extend)
    await engine.start()
    try:
        # the tiny model: 4 layers x K/V x 2 heads x 64 dims x 128 tokens x 4 bytes
        assert vllm_block_bytes(engine._llm) == 4 * 2 * 2 * 64 * 128 * 4
        cached, first = await run(engine, "a-1", PROMPT)
        assert cached == 0
        await evict(engine, "host")
        cached, again = await run(engine, "a-2", PROMPT)
        assert cached >= 384, "the prompt's three full blocks come back from host memory"
        assert again == first
        assert await tier_hits(engine, "CPU") >= 384
        host = {t.medium: t for t in engine.stats().kv_tiers}["CPU"]
        block = vllm_block_bytes(engine._llm)
        assert host.onboard_blocks >= 3 and host.onboard_bytes == host.onboard_blocks * block
        assert host.offload_blocks >= 3 + 5 * 3  # the prompt's and the fillers' full blocks
        assert host.loads >= 1 and host.load_seconds > 0
        for _ in range(50):  # the bridge hands events over on the event loop
            if any(isinstance(e, BlockStored) and e.medium == "CPU" for e in events):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("no host-tier (medium CPU) BlockStored event arrived")
    finally:
        await engine.shutdown()


async def test_disk_tier_serves_a_restarted_engine(model_path: str, tmp_path: Path) -> None:
    tiers: dict[str, object] = {
        "host_kv_blocks": 16,
        "disk_kv_blocks": 64,
        "disk_kv_path": str(tmp_path),
        # the default admission (a block offered twice), which takes every block on its
        # first offer while the disk has room
    }
    cached, first, _ = await run_fresh(model_path, tiers, "d-1")
    assert cached == 0
    assert list(tmp_path.glob("worker-0/*/*/*.kv")), "blocks were written to the disk tier"

    cached, again, disk = await run_fresh(model_path, tiers, "d-2", "DISK")
    assert cached >= 384, "the prompt's full blocks come back from disk"
    assert again == first
    assert disk is not None and disk.hit_tokens >= 384

    # a flipped byte in every record: each fails its check, is deleted and recomputed
    corrupted = {}
    for record in tmp_path.glob("worker-0/*/*/*.kv"):
        data = bytearray(record.read_bytes())
        data[-1] ^= 0xFF
        record.write_bytes(bytes(data))
        corrupted[record] = bytes(data)
    cached, again, disk = await run_fresh(
        model_path, tiers, "d-3", "DISK", lambda t: t.corrupt_blocks > 0
    )
    assert cached == 0
    assert again == first
    assert disk is not None and disk.corrupt_blocks == 1, "the first bad record stops the load"
    assert disk.onboard_blocks == 0 and disk.hit_tokens == 0
    # the first bad block was deleted, and the recomputed blocks were written anew
    assert all(not path.exists() or path.read_bytes() != bad for path, bad in corrupted.items()), (
        "a corrupt record was left on disk"
    )


async def test_shared_tier_serves_another_engine(model_path: str, tmp_path: Path) -> None:
    """One engine stores into a shared folder; a second one (its own host memory, no disk)
    loads the prompt from there, through the asynchronous lookup."""
    tiers = {"host_kv_blocks": 16, "shared_kv": f"file://{tmp_path}"}
    _, first, _ = await run_fresh(model_path, tiers, "s-1")
    cached, again, shared = await run_fresh(model_path, tiers, "s-2", "SHARED")
    assert cached >= 384, "the prompt's full blocks come back from shared storage"
    assert again == first
    assert shared is not None and shared.hit_tokens >= 384


async def test_disk_and_shared_tiers_report_what_they_moved(
    model_path: str, tmp_path: Path
) -> None:
    """The fields the torch engine's disk and shared tiers report, from vLLM's: blocks and
    bytes written, evictions (a 4-block disk under 9 written blocks), used and capacity
    blocks; then, in a second engine, blocks loaded from each and the loads' time."""
    tiers: dict[str, object] = {
        "host_kv_blocks": 16,
        "disk_kv_blocks": 4,
        "disk_kv_path": str(tmp_path / "disk"),
        "disk_kv_admission": 1,
        "shared_kv": f"file://{tmp_path / 'shared'}",
    }
    prompts = [PROMPT, FILLERS[0], FILLERS[1]]  # 3 full blocks each
    engine = VllmEngine(model_path, config(**tiers))
    await engine.start()
    try:
        block = vllm_block_bytes(engine._llm)
        answers = [(await run(engine, f"m-{i}", p))[1] for i, p in enumerate(prompts)]
        disk = await tier_stats(engine, "DISK", lambda t: t.offload_blocks >= 9)
        shared = await tier_stats(engine, "SHARED", lambda t: t.offload_blocks >= 9)
    finally:
        await engine.shutdown()
    assert (disk.offload_blocks, disk.offload_bytes) == (9, 9 * block)
    assert (disk.evicted_blocks, disk.used_blocks, disk.capacity_blocks) == (5, 4, 4)
    assert disk.enabled and disk.errors == 0 and disk.corrupt_blocks == 0
    assert (shared.offload_blocks, shared.offload_bytes) == (9, 9 * block)
    assert (shared.evicted_blocks, shared.capacity_blocks) == (0, 0)
    assert shared.enabled and shared.errors == 0

    # a new engine, host memory empty: the last prompt is on disk still, the first only in
    # shared storage (the disk evicted it)
    engine = VllmEngine(model_path, config(**tiers))
    await engine.start()
    try:
        cached, again = await run(engine, "m-again-2", prompts[2])
        assert (cached, again) == (384, answers[2])
        cached, again = await run(engine, "m-again-0", prompts[0])
        assert (cached, again) == (384, answers[0])
        disk = await tier_stats(engine, "DISK", lambda t: t.onboard_blocks >= 3)
        shared = await tier_stats(engine, "SHARED", lambda t: t.onboard_blocks >= 3)
    finally:
        await engine.shutdown()
    for tier in (disk, shared):
        assert (tier.onboard_blocks, tier.onboard_bytes) == (3, 3 * block), tier.medium
        assert tier.hit_tokens == 384 and tier.loads >= 1 and tier.load_seconds > 0, tier.medium
        assert tier.errors == 0 and tier.corrupt_blocks == 0, tier.medium
    assert disk.used_blocks == 4


def stall_reads(folder: Path) -> dict[Path, bytes]:
    """Replace each block record in ``folder`` by a named pipe: opening one to read it waits
    until something writes it, as reads from a hung NFS server do. Returns the records.

    (vLLM runs its engine core in a spawned process on CPU, so a store class of this test's
    own could not reach it; a stalled file reaches any process.)"""
    records = {}
    for path in folder.glob("*/*/*.kv"):
        records[path] = path.read_bytes()
        path.unlink()
        os.mkfifo(path)
    assert records, "no records to stall"
    return records


def unstall(records: dict[Path, bytes]) -> int:
    """Give each pipe a reader is waiting on its record, so that read ends; returns how many
    were waited on."""
    fed = 0
    for path, data in records.items():
        try:  # non-blocking: fails (ENXIO) when no one is reading this one
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.set_blocking(fd, True)
            os.write(fd, data)
            fed += 1
        finally:
            os.close(fd)
    return fed


async def test_a_load_past_kv_load_timeout_s_is_recomputed(model_path: str, tmp_path: Path) -> None:
    """A shared tier whose reads stall past ``kv_load_timeout_s``: the load is failed, vLLM
    recomputes the prompt (the answer of the engine that computed it first, with no tier
    hit) instead of waiting, and the tier counts one error and stays on."""
    tiers: dict[str, object] = {"host_kv_blocks": 16, "shared_kv": f"file://{tmp_path}"}
    stored, first, _ = await run_fresh(model_path, tiers, "t-1")
    assert stored == 0  # computed: the answer without tiers
    records = stall_reads(tmp_path)
    engine = VllmEngine(model_path, config(**tiers, kv_load_timeout_s=0.2))
    await engine.start()
    try:
        started = time.monotonic()
        cached, again = await run(engine, "t-2", PROMPT)
        took = time.monotonic() - started
        shared = await tier_stats(engine, "SHARED", lambda t: t.errors > 0)
        assert unstall(records) == 1, "the load's read of the first block was still waiting"
    finally:
        unstall(records)  # (after a failure above: else shutdown would wait for that read)
        await engine.shutdown()
    assert again == first
    assert cached == 0, "nothing was delivered before the timeout"
    assert took < 30, "the request waited for the stalled read"
    assert shared.errors == 1, "one timed-out load, counted once"
    assert shared.enabled, "a slow load does not switch the tier off"
    assert shared.onboard_blocks == 0 and shared.hit_tokens == 0


def test_tier_settings_vllm_cannot_honour_are_refused(model_path: str) -> None:
    with pytest.raises(EngineConfigError, match="need a host tier"):
        VllmEngine(model_path, config(disk_kv_blocks=10))
    with pytest.raises(EngineConfigError, match="write_through only"):
        VllmEngine(model_path, config(host_kv_blocks=10, offload_policy="write_back"))
    own = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}
    args = {**ENGINE_ARGS, "kv_transfer_config": own}
    with pytest.raises(EngineConfigError, match="cannot be combined"):
        VllmEngine(model_path, settings(VllmConfig, {"engine_args": args, "host_kv_blocks": 10}))


async def test_a_host_tier_no_larger_than_the_device_cache_is_refused_at_start(
    model_path: str,
) -> None:
    """vLLM sizes its device cache at start (8 blocks here); a host tier of as many blocks,
    in blocks or in GB, would only hold copies of it: start fails with the reason."""
    for knobs in ({"host_kv_blocks": 8}, {"host_kv_gb": 8 * 4 * 2 * 2 * 64 * 128 * 4 / 2**30}):
        engine = VllmEngine(model_path, config(**knobs))
        with pytest.raises(EngineConfigError, match="holds only what the device cache"):
            await engine.start()
        assert engine._llm is None  # shut down again
