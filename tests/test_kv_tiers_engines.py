"""The KV tiers under real engines: what falls out of the device cache is loaded back, not
recomputed, and the outputs stay exactly what they are without tiers.

The torch engine (CPU, fp32, the tiny Llama) checks exactness: greedy outputs with tiers on
equal those with tiers off, for prompts whose history was evicted from the device, loaded from
host memory, from disk after a restart (host empty), and from a shared folder another engine
wrote. The mocker checks the bookkeeping at a scale the torch engine cannot reach here.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dynamo_sdk.llm.disagg.policy import DisaggConfig
from dynamo_sdk.llm.engines.base import Engine, EngineConfigError
from dynamo_sdk.llm.engines.mocker import MockerEngine
from dynamo_sdk.llm.kv.events import BlockRemoved, BlockStored, KvEvent
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats
from dynamo_sdk.llm.protocol import EngineOutput, SamplingOptions
from dynamo_sdk.llm.torch_engine.engine import TorchEngine
from dynamo_sdk.llm.worker.decode import DecodeRole
from tests.engine_requests import collect, make_request, tokens
from tests.redis_server import RedisServer

GREEDY = SamplingOptions(temperature=0.0)
BS = 16


def tier(engine: Engine, medium: str) -> KvTierStats:
    return next(t for t in engine.stats().kv_tiers if t.medium == medium)


def conversations(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 2048) for _ in range(length)] for _ in range(n)]


async def turn(engine: Engine, prompt: list[int], rid: str, n: int = 6) -> list[EngineOutput]:
    req = make_request(prompt, n, request_id=rid, ignore_eos=True, sampling=GREEDY)
    return await collect(engine, req)


async def torch_engine(model_dir: Path, **tiers: Any) -> TorchEngine:
    # 24 device blocks: three 130-token prompts (9 blocks each) do not fit together
    engine = TorchEngine(str(model_dir), num_blocks=24, block_size=BS, **tiers)
    await engine.start()
    return engine


async def second_turns(engine: Engine, firsts: list[list[int]]) -> list[tuple[list[int], int]]:
    """Each conversation's second turn (its first turn plus a few tokens): outputs, cached."""
    out = []
    for i, first in enumerate(firsts):
        outputs = await turn(engine, [*first, 7, 8, 9], f"t2-{i}")
        out.append((tokens(outputs), outputs[0].cached_tokens or 0))
    return out


async def test_torch_outputs_exact_with_host_disk_and_shared_tiers(
    model_dir: Path, tmp_path: Path
) -> None:
    firsts = conversations(4, 130)
    plain = await torch_engine(model_dir)
    try:
        for i, p in enumerate(firsts):
            await turn(plain, p, f"t1-{i}")
        expected = await second_turns(plain, firsts)
    finally:
        await plain.shutdown()
    assert all(cached < 128 for _, cached in expected[:3])  # evicted without tiers

    disk, shared = tmp_path / "disk", tmp_path / "shared"
    knobs = dict(host_kv_blocks=64, disk_kv_blocks=500, disk_kv_path=str(disk),
                 shared_kv=f"file://{shared}", disk_kv_admission=1)  # fmt: skip
    tiered = await torch_engine(model_dir, **knobs)
    try:
        for i, p in enumerate(firsts):
            await turn(tiered, p, f"t1-{i}")
        got = await second_turns(tiered, firsts)
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert all(cached == 128 for _, cached in got)  # 8 full blocks of 130 tokens
        assert tier(tiered, "CPU").hit_tokens >= 3 * 128
    finally:
        await tiered.shutdown()

    # a restart: the host tier is empty, the disk still has every block
    restarted = await torch_engine(model_dir, **knobs)
    try:
        got = await second_turns(restarted, firsts)
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert tier(restarted, "DISK").hit_tokens == 4 * 128
        assert all(cached == 128 for _, cached in got)
    finally:
        await restarted.shutdown()

    # another worker process, with no disk of its own, on the same shared folder
    result = run_other_worker(model_dir, shared, firsts)
    assert result["tokens"] == [t for t, _ in expected]
    assert result["shared_hit_tokens"] == 4 * 128


OTHER_WORKER = """
import asyncio, json, sys
from tests.test_kv_tiers_engines import second_turns, tier, torch_engine

async def main(model_dir, shared, firsts):
    engine = await torch_engine(model_dir, host_kv_blocks=64, shared_kv=f"file://{shared}")
    try:
        got = await second_turns(engine, firsts)
        print(json.dumps({"tokens": [t for t, _ in got],
                          "shared_hit_tokens": tier(engine, "SHARED").hit_tokens}))
    finally:
        await engine.shutdown()

args = json.loads(sys.argv[1])
asyncio.run(main(args["model_dir"], args["shared"], args["firsts"]))
"""


def run_other_worker(model_dir: Path, shared: Path, firsts: list[list[int]]) -> Any:
    """The second turns served by a torch engine in a fresh process (JSON on stdout)."""
    args = json.dumps({"model_dir": str(model_dir), "shared": str(shared), "firsts": firsts})
    done = subprocess.run([sys.executable, "-c", OTHER_WORKER, args], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


async def test_torch_blocks_round_trip_bit_exact_through_the_host_tier(model_dir: Path) -> None:
    engine = await torch_engine(model_dir, host_kv_blocks=64)
    try:
        first = conversations(1, 130, seed=3)[0]
        await turn(engine, first, "a")
        covered, before = engine.export_prefix(first)
        assert covered == 128
        for i, p in enumerate(conversations(3, 130, seed=4)):  # evict it from the device
            await turn(engine, p, f"evict-{i}")
        assert engine.export_prefix(first)[0] < 128
        await turn(engine, [*first, 1], "b")
        covered, after = engine.export_prefix(first)
        assert covered == 128
        assert torch.equal(before, after)
    finally:
        await engine.shutdown()


def test_tier_settings_that_cannot_help_are_refused() -> None:
    with pytest.raises(EngineConfigError, match="holds only what the device"):
        MockerEngine(num_blocks=64, context_length=512, host_kv_blocks=32)
    with pytest.raises(EngineConfigError, match="need a host tier"):
        MockerEngine(num_blocks=64, context_length=512, disk_kv_blocks=100)
    with pytest.raises(EngineConfigError, match="not both"):
        MockerEngine(num_blocks=64, context_length=512, host_kv_blocks=100, host_kv_gb=1.0)
    MockerEngine(
        num_blocks=64, context_length=512, host_kv_blocks=32, offload_policy="write_back"
    )  # useful


async def mocker(speedup: float = 1000, **knobs: Any) -> tuple[MockerEngine, list[KvEvent]]:
    events: list[KvEvent] = []
    engine = MockerEngine(
        num_blocks=32, block_size=BS, context_length=512, speedup=speedup, vocab_size=1000,
        on_events=events.extend, **knobs,
    )  # fmt: skip
    await engine.start()
    return engine, events


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
async def test_mocker_reloads_evicted_history_from_the_host_under_both_policies(
    policy: str,
) -> None:
    engine, events = await mocker(host_kv_blocks=64, offload_policy=policy)
    try:
        firsts = conversations(6, 130)  # 54 blocks through a 32-block device cache
        for i, p in enumerate(firsts):
            await turn(engine, p, f"t1-{i}")
        got = await second_turns(engine, firsts)
        assert [cached for _, cached in got] == [128] * 6
        host = tier(engine, "CPU")
        assert host.hit_tokens >= 3 * 128 and host.onboard_blocks >= 24
        stored = [e for e in events if isinstance(e, BlockStored) and e.medium == "CPU"]
        assert stored, "host-tier stores are announced with their medium"
    finally:
        await engine.shutdown()


async def test_mocker_disk_tier_skips_corrupt_blocks_and_recomputes(tmp_path: Path) -> None:
    knobs = dict(host_kv_blocks=200, disk_kv_blocks=500, disk_kv_path=str(tmp_path),
                 disk_kv_admission=1)  # fmt: skip
    engine, _ = await mocker(**knobs)
    firsts = conversations(6, 130)
    try:
        for i, p in enumerate(firsts):
            await turn(engine, p, f"t1-{i}")
    finally:
        await engine.shutdown()
    files = sorted(tmp_path.rglob("*.kv"))
    assert len(files) == 6 * 8  # every full block, admitted at once
    for i, f in enumerate(files[::2]):  # every other file: torn, or one bit flipped
        data = f.read_bytes()
        f.write_bytes(data[:-1] if i % 2 else data[:-1] + bytes([data[-1] ^ 0x10]))
    restarted, events = await mocker(**knobs)
    try:
        got = await second_turns(restarted, firsts)
        disk = tier(restarted, "DISK")
        assert disk.corrupt_blocks >= 1
        assert disk.hit_tokens == sum(cached for _, cached in got)  # nothing bad was used
        assert sum(cached for _, cached in got) < 6 * 128
        removed = [e for e in events if isinstance(e, BlockRemoved) and e.medium == "DISK"]
        assert removed, "a corrupt block is withdrawn from the router's view"
    finally:
        await restarted.shutdown()


async def test_mocker_shared_redis_stopped_mid_run_degrades_to_recompute(
    redis_server: RedisServer,
) -> None:
    """Two workers share Redis: the second loads what the first stored; with Redis gone,
    every request still succeeds (recomputed), and the tier switches itself off."""
    knobs = dict(host_kv_blocks=40, shared_kv=redis_server.url("timeout=0.3"),
                 shared_kv_gbps=25.0)  # fmt: skip  # faster than recompute: worth reading
    first, _ = await mocker(**knobs)
    second, _ = await mocker(**knobs)
    try:
        firsts = conversations(3, 130)
        for i, p in enumerate(firsts):
            await turn(first, p, f"t1-{i}")
        await asyncio.sleep(0.2)  # the shared writes run on I/O threads
        got = await second_turns(second, firsts)
        assert [cached for _, cached in got] == [128] * 3
        assert tier(second, "SHARED").hit_tokens == 3 * 128

        redis_server.process.send_signal(signal.SIGSTOP)  # hung, not just gone
        later = conversations(3, 130, seed=5)
        for i, p in enumerate(later):
            outputs = await turn(first, p, f"late-{i}")
            assert outputs[-1].finish_reason == "length"
        outputs = await turn(second, [*later[0], 1, 2], "late-second")
        assert outputs[-1].finish_reason == "length"
        await asyncio.sleep(0.5)
        assert not tier(first, "SHARED").enabled or tier(first, "SHARED").errors
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        await first.shutdown()
        await second.shutdown()


def test_block_keys_are_the_same_in_every_process_without_pythonhashseed() -> None:
    """Tier keys (layout namespace + chained block hash) depend on values only, never on
    Python's per-process ``hash()``: fresh interpreters (each with its own random string
    hashing) compute the same keys. (Setting PYTHONHASHSEED changes them on purpose, as in
    vLLM, whose block hashes ours equal: all workers and routers must then share it.)"""
    code = (
        "from dynamo_sdk.llm.kv.hashing import block_hashes\n"
        "from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity, block_key\n"
        "ns = LayoutIdentity(model='m', dtype='bfloat16', block_size=16, num_layers=32,"
        " num_kv_heads=8, head_dim=128).namespace()\n"
        "print([block_key(ns, h) for h in block_hashes(list(range(100)), 16)])\n"
    )
    outs = []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60, check=True)  # fmt: skip
        outs.append(done.stdout)
    assert outs[0] == outs[1] and outs[0].count("/") == 6
    assert outs[0] == str(expected_keys()) + "\n"  # and this process agrees


def expected_keys() -> list[str]:
    from dynamo_sdk.llm.kv.hashing import block_hashes
    from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity, block_key

    ns = LayoutIdentity(model="m", dtype="bfloat16", block_size=16, num_layers=32,
                        num_kv_heads=8, head_dim=128).namespace()  # fmt: skip
    return [block_key(ns, h) for h in block_hashes(list(range(100)), 16)]


def test_worker_log_line_reports_the_hit_rate_per_tier() -> None:
    from dynamo_sdk.llm.engines.base import EngineStats
    from dynamo_sdk.llm.worker.stats import hit_rates

    before = EngineStats(prefix_queried_tokens=1000, prefix_hit_tokens=500,
                         kv_tiers=[KvTierStats(medium="CPU", hit_tokens=100)])  # fmt: skip
    now = EngineStats(prefix_queried_tokens=2000, prefix_hit_tokens=1300,
                      kv_tiers=[KvTierStats(medium="CPU", hit_tokens=200),
                                KvTierStats(medium="DISK", hit_tokens=50)])  # fmt: skip
    assert hit_rates(before, now) == (
        "Prefix cache hit rate: GPU: 80.00%, CPU: 10.00%, DISK: 5.00%"
    )


async def test_mocker_full_disk_budget_evicts_instead_of_failing(tmp_path: Path) -> None:
    knobs = dict(host_kv_blocks=200, disk_kv_blocks=20, disk_kv_path=str(tmp_path),
                 disk_kv_admission=1)  # fmt: skip
    engine, events = await mocker(**knobs)
    try:
        for i, p in enumerate(conversations(8, 130)):  # 64 blocks through a 20-block disk
            outputs = await turn(engine, p, f"t-{i}")
            assert outputs[-1].finish_reason == "length"
        await asyncio.sleep(0.2)
        disk = tier(engine, "DISK")
        assert disk.enabled and disk.errors == 0
        assert disk.used_blocks <= 20 and disk.evicted_blocks == 64 - 20
        assert len(list(tmp_path.rglob("*.kv"))) <= 20
        removed = [e for e in events if isinstance(e, BlockRemoved) and e.medium == "DISK"]
        assert sum(len(e.block_hashes) for e in removed) == disk.evicted_blocks
    finally:
        await engine.shutdown()


async def test_a_request_queued_behind_a_full_device_still_loads_from_the_host() -> None:
    """The queue's head is asked about the tiers when the device can take it, not before:
    one that waited for blocks gets its history from the host once they free up."""
    engine, _ = await mocker(speedup=10, host_kv_blocks=200)  # the hog decodes for ~20 ms
    try:
        history = conversations(1, 130, seed=11)[0]
        await turn(engine, history, "first")
        for i, p in enumerate(conversations(4, 130, seed=12)):  # evict it from the device
            await turn(engine, p, f"evict-{i}")
        assert engine.cached_prefix_tokens(history) == 128  # on the host now
        hog = make_request(conversations(1, 400, seed=13)[0], 40, request_id="hog",
                           ignore_eos=True)  # fmt: skip  # 25 of the 32 device blocks
        hogging = asyncio.create_task(collect(engine, hog))
        await asyncio.sleep(0.005)
        assert engine.stats().running == 1
        outputs = await turn(engine, [*history, 5, 6], "queued")
        await hogging
        assert outputs[0].cached_tokens == 128
    finally:
        await engine.shutdown()


async def test_torch_write_back_keeps_evicted_blocks_exact_when_only_loads_are_running(
    model_dir: Path,
) -> None:
    """A load's allocation evicts cached blocks (write-back copies them to the host); when
    no step runs because every request is loading, those copies must still go before the
    load overwrites the blocks, or the host keeps the new KV under the old hash."""
    p, *qs = conversations(5, 130, seed=21)
    plain = await torch_engine(model_dir)
    try:
        expected = [tokens(await turn(plain, [*x, 3], f"ref-{i}")) for i, x in enumerate(qs)]
    finally:
        await plain.shutdown()
    engine = await torch_engine(model_dir, host_kv_blocks=64, offload_policy="write_back")
    try:
        for i, x in enumerate((p, *qs)):  # 45 blocks through 24: P goes to the host
            await turn(engine, x, f"first-{i}")
        await turn(engine, [*p, 3], "p-again")  # a lone load, evicting cached Q blocks
        assert tier(engine, "CPU").hit_tokens >= 128
        got = [tokens(await turn(engine, [*x, 3], f"again-{i}")) for i, x in enumerate(qs)]
        assert got == expected
        assert tier(engine, "CPU").hit_tokens >= 3 * 128
    finally:
        await engine.shutdown()


class _EmptyPrefillQueue:
    """The prefill queue's depth, for the rule alone (no prefill worker takes anything)."""

    async def depth(self) -> int:
        return 0


async def test_decode_worker_loads_from_shared_storage_instead_of_a_remote_prefill(
    tmp_path: Path,
) -> None:
    """A prompt another worker stored in shared storage is not cached locally (the router's
    local count says so), but the disaggregation rule asks the shared tier before it sends
    the prompt to a prefill worker: it is loaded here, and only an unknown prompt goes."""
    knobs = dict(host_kv_blocks=40, shared_kv=f"file://{tmp_path / 'shared'}", shared_kv_gbps=25.0)
    first, _ = await mocker(**knobs)
    second, _ = await mocker(**knobs)
    try:
        stored, unknown = conversations(2, 130, seed=31)
        await turn(first, stored, "stored")
        await first.tiers.drain_writes()  # type: ignore[union-attr]
        assert second.cached_prefix_tokens(stored) == 0  # nothing local ...
        assert await second.stored_prefix_tokens(stored) == 128  # ... 8 blocks shared
        assert await second.stored_prefix_tokens(unknown) == 0

        role = DecodeRole(second, DisaggConfig(remote_prefill=True, max_local_prefill_length=64))
        role.queue = _EmptyPrefillQueue()  # type: ignore[assignment]
        assert not await role._goes_remote(make_request([*stored, 5], 4, request_id="again"))
        assert await role._goes_remote(make_request(unknown, 4, request_id="new"))
        assert role.counts.local_short == 1
        outputs = await turn(second, [*stored, 5], "again")
        assert outputs[0].cached_tokens == 128 and tier(second, "SHARED").hit_tokens == 128
    finally:
        await first.shutdown()
        await second.shutdown()


async def test_mocker_recomputes_shared_blocks_slower_to_read_than_to_compute(
    tmp_path: Path,
) -> None:
    """At the timing model's defaults a shared block takes 2.2 ms to read and 0.8 ms to
    recompute: the prompt is recomputed (counted as a declined load), and the disaggregation
    rule does not count it as loadable; at 25 GB/s the same blocks are read."""
    firsts = conversations(2, 130, seed=41)
    for gbps, loaded in ((1.0, 0), (25.0, 128)):
        knobs = dict(host_kv_blocks=40, shared_kv=f"file://{tmp_path / str(gbps)}",
                     shared_kv_gbps=gbps)  # fmt: skip
        first, _ = await mocker(**knobs)
        second, _ = await mocker(**knobs)
        try:
            await turn(first, firsts[0], "stored")
            await first.tiers.drain_writes()  # type: ignore[union-attr]
            assert await second.stored_prefix_tokens(firsts[0]) == loaded
            outputs = await turn(second, [*firsts[0], 5], "again")
            assert outputs[0].cached_tokens == loaded
            shared = tier(second, "SHARED")
            assert shared.hit_tokens == loaded
            assert (shared.declined_loads > 0) == (loaded == 0)
        finally:
            await first.shutdown()
            await second.shutdown()
