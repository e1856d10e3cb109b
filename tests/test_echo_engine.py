"""EchoEngine: the model-free engine that tests and benchmarks lean on must honour the contract."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_sdk.llm.engines.base import Engine, EngineError
from dynamo_sdk.llm.engines.echo import EchoEngine
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    TokenLogprob,
)
from tests.engine_requests import collect, make_request, tokens


async def test_echoes_prompt_one_token_per_output() -> None:
    engine = EchoEngine()
    await engine.start()
    outs = await collect(engine, make_request([5, 6, 7], max_tokens=3))
    assert [o.token_ids for o in outs] == [[5], [6], [7]]
    assert [o.finish_reason for o in outs] == [None, None, "length"]
    assert outs[0].cached_tokens == 0
    assert outs[0].logprobs is None and outs[0].top_logprobs is None
    assert isinstance(engine, Engine)


async def test_cycles_when_max_tokens_exceeds_prompt() -> None:
    outs = await collect(EchoEngine(), make_request([1, 2, 3], max_tokens=7))
    assert tokens(outs) == [1, 2, 3, 1, 2, 3, 1]
    assert outs[-1].finish_reason == "length"


async def test_max_tokens_shorter_than_prompt() -> None:
    outs = await collect(EchoEngine(), make_request([1, 2, 3, 4], max_tokens=2))
    assert tokens(outs) == [1, 2]
    assert outs[-1].finish_reason == "length"


async def test_zero_max_tokens_still_finishes() -> None:
    outs = await collect(EchoEngine(), make_request([1, 2], max_tokens=0))
    assert outs == [EngineOutput(token_ids=[], finish_reason="length", cached_tokens=0)]


async def test_stop_token_ends_with_stop() -> None:
    outs = await collect(EchoEngine(), make_request([1, 2, 3, 4], 10, stop_token_ids=[3]))
    assert tokens(outs) == [1, 2, 3]
    assert outs[-1].finish_reason == "stop"


async def test_min_tokens_suppresses_early_stop() -> None:
    # the stop id 1 is generated first at position 1 (ignored: min_tokens) then at position 4
    outs = await collect(
        EchoEngine(), make_request([1, 2, 3], 10, min_tokens=2, stop_token_ids=[1])
    )
    assert tokens(outs) == [1, 2, 3, 1]
    assert outs[-1].finish_reason == "stop"


async def test_ignore_eos_ignores_stop_ids() -> None:
    outs = await collect(EchoEngine(), make_request([1, 2], 5, stop_token_ids=[2], ignore_eos=True))
    assert tokens(outs) == [1, 2, 1, 2, 1]
    assert outs[-1].finish_reason == "length"


async def test_logprobs() -> None:
    outs = await collect(EchoEngine(), make_request([9, 8], 2, logprobs=3))
    assert [o.logprobs for o in outs] == [[0.0], [0.0]]
    assert [o.top_logprobs for o in outs] == [[[TokenLogprob(9, 0.0)]], [[TokenLogprob(8, 0.0)]]]


async def test_rejects_prompt_over_context_length() -> None:
    with pytest.raises(EngineError, match="context length"):
        await collect(EchoEngine(context_length=4), make_request([1, 2, 3, 4, 5], 2))
    with pytest.raises(EngineError, match="empty"):
        await collect(EchoEngine(), make_request([], 2))


async def test_early_close_decrements_running() -> None:
    engine = EchoEngine()
    stream = engine.generate(make_request([1, 2, 3], 1000))
    seen = 0
    async for _ in stream:
        seen += 1
        assert engine.stats().running == 1
        if seen == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    stats = engine.stats()
    assert stats.running == 0
    assert stats.generation_tokens_total == 3
    assert stats.prompt_tokens_total == 3


async def test_task_cancellation_decrements_running() -> None:
    engine = EchoEngine(token_delay=0.01)

    async def consume() -> None:
        async for _ in engine.generate(make_request([1], 10_000)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    assert engine.stats().running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().running == 0


async def test_concurrent_requests_interleave_and_count() -> None:
    engine = EchoEngine()
    n, max_tokens = 8, 20
    results = await asyncio.gather(
        *(
            collect(engine, make_request([i, i + 100], max_tokens, request_id=f"r{i}"))
            for i in range(n)
        )
    )
    for i, outs in enumerate(results):
        assert tokens(outs) == [i, i + 100] * (max_tokens // 2)
    stats = engine.stats()
    assert stats.running == 0
    assert stats.max_batch_running == n  # sleep(0) per token: all were in flight together
    assert stats.generation_tokens_total == n * max_tokens
    assert stats.prompt_tokens_total == n * 2


async def test_token_delay_paces_output() -> None:
    engine = EchoEngine(token_delay=0.02)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await collect(engine, make_request([1], 5))
    assert loop.time() - start >= 0.09


def test_registry_builds_echo_and_rejects_unknown() -> None:
    engine = create_engine("echo", None, {"context_length": 128, "token_delay": 0.5})
    assert isinstance(engine, EchoEngine)
    assert engine.context_length == 128 and engine.token_delay == 0.5
    with pytest.raises(EngineError, match=r"known engines: echo, mocker, torch, vllm"):
        create_engine("nope", None, {})


async def test_a_chat_turn_is_answered_once_with_its_latest_message() -> None:
    """`latest_message` names the span to echo; then the first stop id ends the reply."""
    request = make_request([1, 2, 3, 4, 5, 6, 9], max_tokens=50, stop_token_ids=[9, 8])
    request.latest_message = [3, 5]
    assert tokens(await collect(EchoEngine(), request)) == [4, 5, 9]
    request.stop.ignore_eos = True  # no stop: the message repeats up to max_tokens
    request.stop.max_tokens = 5
    assert tokens(await collect(EchoEngine(), request)) == [4, 5, 4, 5, 4]
    request.latest_message = [6, 99]  # a span outside the prompt: the prompt is echoed
    assert tokens(await collect(EchoEngine(), request)) == [1, 2, 3, 4, 5]


def test_merged_outputs_keep_tokens_logprobs_and_the_last_finish() -> None:
    from dynamo_sdk.llm.protocol import merge_outputs

    first = EngineOutput([1], logprobs=[-0.1], cached_tokens=4)
    second = EngineOutput([2, 3], logprobs=[-0.2, -0.3], finish_reason="length")
    merged = merge_outputs([first, second])
    assert merged.token_ids == [1, 2, 3] and merged.logprobs == [-0.1, -0.2, -0.3]
    assert merged.finish_reason == "length" and merged.cached_tokens == 4
    assert merged.top_logprobs is None and merge_outputs([first]) is first
