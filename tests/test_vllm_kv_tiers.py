"""KV tiers on `engine: vllm`: vLLM's OffloadingConnector with our spec and stores (CPU build).

A device cache of a few blocks, a prompt, other prompts that evict it, the prompt again: it
comes back from host memory (`cached_tokens` > 0) and greedy decoding gives the same tokens.
With a disk tier, a second engine on the same folder (host memory empty) gets it from disk.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
from pathlib import Path

import pytest

from dynamo_sdk.llm.engines.base import EngineConfigError
from dynamo_sdk.llm.engines.configs import VllmConfig, settings
from dynamo_sdk.llm.engines.vllm_engine import VllmEngine, vllm_block_bytes
from dynamo_sdk.llm.kv.events import BlockStored, KvEvent
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
    outs = await collect(engine, request(request_id, token_ids))
    return outs[0].cached_tokens or 0, tokens(outs)


async def evict(engine: VllmEngine, tag: str) -> None:
    for i, filler in enumerate(FILLERS):
        cached, _ = await run(engine, f"{tag}-filler-{i}", filler)
        assert cached == 0


async def run_fresh(
    model_path: str, tiers: dict[str, object], request_id: str, medium: str = ""
) -> tuple[int, list[int], int]:
    """A new engine with ``tiers`` answers PROMPT once and shuts down (its writes to the tiers
    below finish first): (cached tokens, answer, tokens its stats say ``medium`` served)."""
    engine = VllmEngine(model_path, config(**tiers))
    await engine.start()
    try:
        cached, answer = await run(engine, request_id, PROMPT)
        return cached, answer, (await tier_hits(engine, medium) if medium else 0)
    finally:
        await engine.shutdown()


async def tier_hits(engine: VllmEngine, medium: str) -> int:
    for _ in range(50):  # stats arrive with the step outputs, a moment after the request
        hits = {t.medium: t.hit_tokens for t in engine.stats().kv_tiers}.get(medium, 0)
        if hits:
            return hits
        await asyncio.sleep(0.1)
    return 0


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
        "disk_kv_admission": 1,  # write every block
    }
    cached, first, _ = await run_fresh(model_path, tiers, "d-1")
    assert cached == 0
    assert list(tmp_path.glob("worker-0/*/*/*.kv")), "blocks were written to the disk tier"

    cached, again, hits = await run_fresh(model_path, tiers, "d-2", "DISK")
    assert cached >= 384, "the prompt's full blocks come back from disk"
    assert again == first
    assert hits >= 384

    # a flipped byte in every record: each fails its check, is deleted and recomputed
    corrupted = {}
    for record in tmp_path.glob("worker-0/*/*/*.kv"):
        data = bytearray(record.read_bytes())
        data[-1] ^= 0xFF
        record.write_bytes(bytes(data))
        corrupted[record] = bytes(data)
    cached, again, _ = await run_fresh(model_path, tiers, "d-3")
    assert cached == 0
    assert again == first
    # the first bad block was deleted, and the recomputed blocks were written anew
    assert all(not path.exists() or path.read_bytes() != bad for path, bad in corrupted.items()), (
        "a corrupt record was left on disk"
    )


async def test_shared_tier_serves_another_engine(model_path: str, tmp_path: Path) -> None:
    """One engine stores into a shared folder; a second one (its own host memory, no disk)
    loads the prompt from there, through the asynchronous lookup."""
    tiers = {"host_kv_blocks": 16, "shared_kv": f"file://{tmp_path}"}
    _, first, _ = await run_fresh(model_path, tiers, "s-1")
    cached, again, hits = await run_fresh(model_path, tiers, "s-2", "SHARED")
    assert cached >= 384, "the prompt's full blocks come back from shared storage"
    assert again == first
    assert hits >= 384


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
