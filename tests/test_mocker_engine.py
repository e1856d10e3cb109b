"""MockerEngine: the simulated vLLM that routing, disaggregation and planning tests run on.

Assertions lean on the engine's own accounting (cached tokens, computed prompt tokens, steps,
the simulated clock) rather than wall-clock time, so they hold on a loaded CI machine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dynamo_sdk.llm.engines.base import Engine, EngineError
from dynamo_sdk.llm.engines.mocker import MockerEngine
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.kv.events import BlockRemoved, BlockStored, KvEvent, LoadMetrics
from tests.engine_requests import collect, make_request, tokens

FAST: dict[str, Any] = {"speedup": 1000.0}


async def started(**kwargs: Any) -> MockerEngine:
    engine = MockerEngine(**{**FAST, **kwargs})
    await engine.start()
    return engine


async def test_max_tokens_and_length_finish() -> None:
    engine = await started()
    try:
        assert isinstance(engine, Engine)
        outs = await collect(engine, make_request(list(range(1, 20)), max_tokens=7))
        assert len(tokens(outs)) == 7
        assert all(0 <= t < engine.vocab_size for t in tokens(outs))
        assert outs[-1].finish_reason == "length"
        assert all(o.finish_reason is None for o in outs[:-1])
        assert outs[0].cached_tokens == 0
        assert all(o.cached_tokens is None for o in outs[1:])
        stats = engine.stats()
        assert stats.generation_tokens_total == 7 and stats.prompt_tokens_total == 19
        assert stats.running == 0 and stats.waiting == 0 and stats.kv_usage == 0.0
    finally:
        await engine.shutdown()


async def test_stop_tokens_respect_min_tokens() -> None:
    engine = await started()
    try:
        prompt = list(range(100, 140))
        reference = tokens(await collect(engine, make_request(prompt, max_tokens=12)))
        stop_at = 4
        first = reference.index(reference[stop_at])  # its first occurrence
        outs = await collect(
            engine, make_request(prompt, max_tokens=12, stop_token_ids=[reference[stop_at]])
        )
        assert tokens(outs) == reference[: first + 1]
        assert outs[-1].finish_reason == "stop"
        # a stop id generated before min_tokens is not a stop
        outs = await collect(
            engine,
            make_request(prompt, max_tokens=12, min_tokens=3, stop_token_ids=[reference[0]]),
        )
        got = tokens(outs)
        assert got[0] == reference[0] and len(got) > 1
        assert got == reference[: len(got)]
    finally:
        await engine.shutdown()


async def test_zero_max_tokens_and_bad_requests() -> None:
    engine = MockerEngine(**FAST, context_length=64, num_blocks=8, block_size=8)
    with pytest.raises(EngineError, match="before start"):
        await collect(engine, make_request([1, 2], max_tokens=1))
    await engine.start()
    try:
        outs = await collect(engine, make_request([1, 2], max_tokens=0))
        assert [(o.token_ids, o.finish_reason) for o in outs] == [([], "length")]
        with pytest.raises(EngineError, match="empty prompt"):
            await collect(engine, make_request([], max_tokens=1))
        with pytest.raises(EngineError, match="context length"):
            await collect(engine, make_request(list(range(64)), max_tokens=1))
        # generation stops at the context length
        outs = await collect(engine, make_request(list(range(60)), max_tokens=100))
        assert len(tokens(outs)) == 4 and outs[-1].finish_reason == "length"
    finally:
        await engine.shutdown()


async def test_deterministic_by_seed_and_prompt() -> None:
    a, b, c = await started(seed=1), await started(seed=1), await started(seed=2)
    try:
        prompt = list(range(50))
        ta = tokens(await collect(a, make_request(prompt, max_tokens=16)))
        tb = tokens(await collect(b, make_request(prompt, max_tokens=16)))
        tc = tokens(await collect(c, make_request(prompt, max_tokens=16)))
        other = tokens(await collect(a, make_request([*prompt, 7], max_tokens=16)))
        assert ta == tb
        assert ta != tc
        assert ta != other
    finally:
        for engine in (a, b, c):
            await engine.shutdown()


async def test_logprobs() -> None:
    engine = await started()
    try:
        outs = await collect(engine, make_request([1, 2, 3], max_tokens=3, logprobs=2))
        for out in outs:
            assert out.logprobs is not None and out.top_logprobs is not None
            assert len(out.logprobs) == len(out.token_ids) == len(out.top_logprobs)
            for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
                assert lp <= 0 and top[0].token_id == tok and top[0].logprob == lp
                assert len(top) == 3
        plain = await collect(engine, make_request([1, 2, 3], max_tokens=1))
        assert plain[0].logprobs is None and plain[0].top_logprobs is None
    finally:
        await engine.shutdown()


async def test_prefix_cache_hit_cuts_prefill_and_ttft() -> None:
    engine = await started(block_size=16)
    try:
        prompt = list(range(1000, 1256))  # 256 tokens, 16 blocks
        first = await collect(engine, make_request(prompt, max_tokens=2, request_id="a"))
        computed_after_first = engine.computed_prompt_tokens
        second = await collect(engine, make_request(prompt, max_tokens=2, request_id="b"))
        assert first[0].cached_tokens == 0
        # all full blocks but the last: at least one prompt token is always computed
        assert second[0].cached_tokens == 240
        assert computed_after_first == 256
        assert engine.computed_prompt_tokens - computed_after_first == 16
        ttft_a, ttft_b = engine.simulated_ttft_ms("a"), engine.simulated_ttft_ms("b")
        assert ttft_a is not None and ttft_b is not None
        assert ttft_b < ttft_a
        assert tokens(first) == tokens(second)
        assert engine.stats().prefix_cache_hit_rate == pytest.approx(240 / 512)
    finally:
        await engine.shutdown()


async def test_timing_model_on_the_simulated_clock() -> None:
    engine = await started(
        prefill_ms_per_token=0.05,
        prefill_ms_quadratic=1e-4,
        decode_ms_base=5.0,
        decode_ms_per_seq=0.5,
        decode_ms_per_ctx_token=0.01,
        enable_prefix_caching=False,
    )
    try:
        prompt = list(range(100))
        await collect(engine, make_request(prompt, max_tokens=3, request_id="t"))
        prefill = 5.0 + 100 * 0.05 + 1e-4 * 100 * 100
        assert engine.simulated_ttft_ms("t") == pytest.approx(prefill)
        decodes = sum(5.0 + 0.5 + 0.01 * ctx for ctx in (101, 102))
        assert engine.simulated_time_ms == pytest.approx(prefill + decodes)
        assert engine.num_steps == 3
    finally:
        await engine.shutdown()


async def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    engine = await started(max_num_batched_tokens=32, enable_prefix_caching=False)
    try:
        outs = await collect(engine, make_request(list(range(100)), max_tokens=1))
        assert len(tokens(outs)) == 1
        assert engine.num_steps == 4  # 32 + 32 + 32 + 4 tokens, the token on the last step
        assert engine.computed_prompt_tokens == 100
    finally:
        await engine.shutdown()


async def test_sleeps_follow_the_timing_model() -> None:
    engine = MockerEngine(decode_ms_base=20.0, speedup=1.0)
    await engine.start()
    try:
        t0 = time.monotonic()
        await collect(engine, make_request([1, 2, 3], max_tokens=5))
        assert time.monotonic() - t0 >= 5 * 0.020 * 0.9
    finally:
        await engine.shutdown()


async def test_continuous_batching() -> None:
    engine = await started()
    try:
        reqs = [
            make_request(list(range(i, i + 30)), max_tokens=5 + i, request_id=f"r{i}")
            for i in range(8)
        ]
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        for i, outs in enumerate(results):
            assert len(tokens(outs)) == 5 + i
            assert outs[-1].finish_reason == "length"
        stats = engine.stats()
        assert stats.max_batch_running > 1
        assert stats.running == 0 and stats.kv_usage == 0.0
        assert stats.generation_tokens_total == sum(5 + i for i in range(8))
        # batched: far fewer steps than requests run one after another would take
        assert engine.num_steps < sum(1 + 5 + i for i in range(8)) // 2
    finally:
        await engine.shutdown()


async def test_max_num_seqs_queues_the_rest() -> None:
    engine = await started(max_num_seqs=2, speedup=1.0, decode_ms_base=5.0)  # 0.1 s a pair
    try:
        tasks = [
            asyncio.create_task(collect(engine, make_request([i, 1, 2], 20, request_id=f"q{i}")))
            for i in range(5)
        ]
        await asyncio.sleep(0)
        for _ in range(100):
            stats = engine.stats()
            if stats.running:
                break
            await asyncio.sleep(0.001)
        assert stats.running == 2 and stats.waiting == 3
        results = await asyncio.gather(*tasks)
        assert all(len(tokens(r)) == 20 for r in results)
        assert engine.stats().max_batch_running == 2
    finally:
        await engine.shutdown()


async def test_cancellation_frees_blocks_at_once() -> None:
    engine = await started(max_num_seqs=1)
    try:
        stream = engine.generate(make_request(list(range(64)), max_tokens=10_000))
        it = aiter(stream)
        await anext(it)
        await anext(it)
        # a second request waits behind the first (max_num_seqs=1); cancel it while queued
        queued = asyncio.create_task(collect(engine, make_request([5, 6, 7], max_tokens=50)))
        for _ in range(100):
            if engine.stats().waiting == 1:
                break
            await asyncio.sleep(0.001)
        assert engine.stats().waiting == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert engine.stats().waiting == 0
        assert engine.stats().kv_usage > 0
        await stream.aclose()  # type: ignore[attr-defined]
        stats = engine.stats()
        assert stats.running == 0 and stats.waiting == 0
        assert stats.kv_usage == 0.0 and engine.block_manager.num_active_blocks == 0
        # the engine carries on serving
        outs = await collect(engine, make_request([1, 2, 3], max_tokens=3))
        assert len(tokens(outs)) == 3
        engine.block_manager.check_invariants()
    finally:
        await engine.shutdown()


async def test_preemption_under_a_tiny_cache_completes_everything() -> None:
    small = dict(num_blocks=16, block_size=4, context_length=64)
    engine = await started(**small)
    roomy = await started(num_blocks=256, block_size=4, context_length=64)
    try:
        reqs = [
            make_request([i, *range(100, 109)], max_tokens=30, request_id=f"p{i}") for i in range(6)
        ]  # each ends at 40 tokens = 10 blocks; 6 of them need 60 of 16 blocks
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        expected = [tokens(await collect(roomy, r)) for r in reqs]
        assert engine.num_preemptions > 0
        assert [tokens(r) for r in results] == expected  # recomputation changes nothing
        # the hit rate counts each prompt once: re-admissions after preemption are left out
        assert engine.stats().prefix_queried_tokens == sum(len(r.token_ids) for r in reqs)
        assert all(r[-1].finish_reason == "length" for r in results)
        assert engine.stats().kv_usage == 0.0
        engine.block_manager.check_invariants()
    finally:
        await engine.shutdown()
        await roomy.shutdown()


async def test_kv_events_stored_and_removed() -> None:
    ctor_events: list[KvEvent] = []
    late_events: list[KvEvent] = []
    engine = MockerEngine(**FAST, num_blocks=8, block_size=4, context_length=32,
                          on_events=ctor_events.extend)  # fmt: skip
    engine.kv_events().subscribe(late_events.extend)
    await engine.start()
    try:
        await collect(engine, make_request(list(range(12)), max_tokens=1))
        stored = [e for e in ctor_events if isinstance(e, BlockStored)]
        assert stored and stored[0].parent_block_hash is None
        assert stored[0].token_ids[:12] == list(range(12)) and stored[0].block_size == 4
        assert not any(isinstance(e, BlockRemoved) for e in ctor_events)
        # other prompts need the cached blocks back: they are evicted and announced removed
        for i in range(3):
            await collect(engine, make_request([50 + i] * 24, max_tokens=1))
        removed = {h for e in ctor_events if isinstance(e, BlockRemoved) for h in e.block_hashes}
        assert set(stored[0].block_hashes) & removed
        assert late_events == ctor_events
    finally:
        await engine.shutdown()


async def test_failing_event_callback_does_not_break_serving() -> None:
    def boom(events: list[KvEvent]) -> None:
        raise RuntimeError("publisher down")

    engine = await started(on_events=boom)
    try:
        outs = await collect(engine, make_request(list(range(40)), max_tokens=3))
        assert len(tokens(outs)) == 3
    finally:
        await engine.shutdown()


async def test_load_metrics() -> None:
    engine = await started(num_blocks=64, block_size=4, context_length=128)
    try:
        idle = engine.load_metrics(7)
        assert idle == LoadMetrics(
            worker_id=7, kv_usage=0.0, active_blocks=0, total_blocks=64, running=0, waiting=0
        )
        stream = engine.generate(make_request(list(range(16)), max_tokens=1000))
        it = aiter(stream)
        await anext(it)
        busy = engine.load_metrics(7)
        assert busy.running == 1 and busy.active_blocks >= 4
        assert busy.kv_usage == pytest.approx(busy.active_blocks / 64)
        await stream.aclose()  # type: ignore[attr-defined]
        assert engine.load_metrics(7).active_blocks == 0
    finally:
        await engine.shutdown()


async def test_shutdown_fails_requests_in_flight() -> None:
    engine = await started()
    stream = engine.generate(make_request([1, 2, 3], max_tokens=100_000))
    it = aiter(stream)
    await anext(it)
    await engine.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        async for _ in it:
            pass
    assert engine.stats().running == 0


async def test_created_through_the_registry() -> None:
    engine = create_engine(
        "mocker",
        None,
        {"num_blocks": 128, "block_size": 8, "context_length": 1024, "speedup": 500,
         "decode_ms_base": 1, "enable_prefix_caching": False, "seed": 3},
    )  # fmt: skip
    assert isinstance(engine, MockerEngine)
    assert engine.block_manager.num_blocks == 128 and engine.block_size == 8
    assert engine.speedup == 500.0 and isinstance(engine.decode_ms_base, float)
    await engine.start()
    try:
        outs = [o async for o in engine.generate(make_request([1, 2, 3], max_tokens=4))]
        assert len(tokens(outs)) == 4
    finally:
        await engine.shutdown()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"num_blokcs": 10}, r"unknown key 'num_blokcs' \(valid keys: block_size"),
        ({"enable_prefix_caching": "false"}, r"enable_prefix_caching: expected `bool`"),
        ({"num_blocks": "many"}, r"num_blocks: expected `int`, got `str`"),
        ({"num_blocks": 0}, r"num_blocks: expected `int` >= 1"),
        ({"decode_ms_base": -1}, r"decode_ms_base: expected `float` >= 0"),
        ({"num_blocks": 4, "block_size": 16, "context_length": 128}, "exceeds the KV cache"),
    ],
)
def test_bad_config_is_rejected(config: dict[str, Any], match: str) -> None:
    with pytest.raises(EngineError, match=match):
        create_engine("mocker", None, config)


async def test_draws_ids_from_the_served_models_tokenizer(model_dir: Any, tokenizer: Any) -> None:
    """With a model folder, every id decodes (the tiny tokenizer has 2,048 of 32,000)."""
    engine = create_engine("mocker", str(model_dir), {"speedup": 500})
    assert isinstance(engine, MockerEngine) and engine.vocab_size == tokenizer.vocab_size
    await engine.start()
    try:
        outs = await collect(engine, make_request([5, 6, 7], max_tokens=64, ignore_eos=True))
        ids = tokens(outs)
        assert len(ids) == 64 and max(ids) < tokenizer.vocab_size
        assert tokenizer.decode(ids).strip()
    finally:
        await engine.shutdown()
    explicit = create_engine("mocker", str(model_dir), {"vocab_size": 100})
    assert isinstance(explicit, MockerEngine) and explicit.vocab_size == 100


async def test_output_channel_merges_what_the_consumer_has_not_taken() -> None:
    """The scheduler's per-sequence channel: untaken deltas merge, errors and finishes stay."""
    from dynamo_sdk.llm.engines.scheduler import OutputChannel
    from dynamo_sdk.llm.protocol import EngineOutput

    channel = OutputChannel()
    waiting = asyncio.ensure_future(channel.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    channel.put(EngineOutput(token_ids=[1], cached_tokens=3))
    first = await asyncio.wait_for(waiting, 1)
    assert first.token_ids == [1] and first.cached_tokens == 3
    for token in (2, 3, 4):  # the consumer is behind: one delta for all three
        channel.put(EngineOutput(token_ids=[token]))
    channel.put(EngineOutput(token_ids=[5], finish_reason="length"))
    assert len(channel) == 1
    merged = await channel.get()
    assert merged.token_ids == [2, 3, 4, 5] and merged.finish_reason == "length"
    channel.put(EngineOutput(token_ids=[6], finish_reason="stop"))
    channel.put(EngineOutput(token_ids=[7]))  # nothing merges into a finished delta
    channel.put(EngineError("failed"))
    assert len(channel) == 3
    assert (await channel.get()).token_ids == [6]
    assert (await channel.get()).token_ids == [7]
    assert isinstance(await channel.get(), EngineError)
