"""VllmEngine against a real vLLM (CPU) serving the tiny test model.

Starting vLLM costs tens of seconds, so one engine is shared by the whole module, on one
module-scoped event loop (AsyncLLM's output handler task lives on the loop that started it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from dynamo_sdk.llm.disagg.protocol import KvLayout
from dynamo_sdk.llm.engines.base import EngineError
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.engines.vllm_engine import VllmEngine
from dynamo_sdk.llm.protocol import (
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_sdk.llm.testing.tiny_model import build_tiny_model
from tests.engine_requests import collect, tokens

# find_spec, not importorskip: importing vLLM takes seconds, and collecting a fast run
# (`-m "not slow"`) must not pay for it (the engine modules import vLLM lazily).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]
module_loop = pytest.mark.asyncio(loop_scope="module")

ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 2048, "dtype": "float32"}
PROMPT = [1, 5, 9, 33, 100, 250, 7, 42]


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(build_tiny_model())


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(model_path: str) -> AsyncIterator[VllmEngine]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would take most of RAM
        eng = VllmEngine(model_path, ENGINE_ARGS)
        await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def make_request(
    request_id: str,
    max_tokens: int,
    *,
    token_ids: list[int] | None = None,
    stop_token_ids: list[int] | None = None,
    logprobs: int | None = None,
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=request_id,
        model="tiny",
        token_ids=token_ids or PROMPT,
        stop=StopConditions(max_tokens=max_tokens, stop_token_ids=stop_token_ids or []),
        sampling=SamplingOptions(temperature=0.0),
        output=OutputOptions(logprobs=logprobs),
    )


async def settle(engine: VllmEngine, timeout: float = 5.0) -> None:
    """Wait until vLLM reports nothing running and no KV blocks in use."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.kv_usage == 0.0:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"engine did not go idle within {timeout}s: {engine.stats()}")


@module_loop
async def test_greedy_length_and_determinism(engine: VllmEngine) -> None:
    assert engine.context_length == 2048
    first = await collect(engine, make_request("greedy-1", 16))
    second = await collect(engine, make_request("greedy-2", 16))
    assert len(tokens(first)) == 16
    assert [o.finish_reason for o in first][-1] == "length"
    assert all(o.finish_reason is None for o in first[:-1])
    assert first[0].cached_tokens is not None
    assert tokens(first) == tokens(second)
    stats = engine.stats()
    assert stats.generation_tokens_total >= 32
    assert stats.prompt_tokens_total >= 2 * len(PROMPT)
    # the second run's prompt was found in vLLM's prefix cache (whole blocks only)
    assert second[0].cached_tokens is not None


@module_loop
async def test_stop_token_ids(engine: VllmEngine) -> None:
    greedy = tokens(await collect(engine, make_request("stop-ref", 16)))
    stop_id = greedy[2]
    expected = greedy[: greedy.index(stop_id) + 1]  # it may also occur earlier
    outs = await collect(engine, make_request("stop", 16, stop_token_ids=[stop_id]))
    assert tokens(outs) == expected
    assert outs[-1].finish_reason == "stop"


@module_loop
async def test_logprobs(engine: VllmEngine) -> None:
    greedy = tokens(await collect(engine, make_request("lp-ref", 8)))
    outs = await collect(engine, make_request("lp", 8, logprobs=2))
    assert tokens(outs) == greedy
    for out in outs:
        assert out.logprobs is not None and out.top_logprobs is not None
        assert len(out.logprobs) == len(out.top_logprobs) == len(out.token_ids)
        for token, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
            assert len(top) == 2
            assert top[0].logprob >= top[1].logprob
            assert logprob <= 0.0
            # greedy: the sampled token is the most likely one
            assert top[0].token_id == token
            assert top[0].logprob == pytest.approx(logprob)


@module_loop
async def test_concurrent_requests_are_batched(engine: VllmEngine) -> None:
    n, max_tokens = 16, 24
    results = await asyncio.gather(
        *(
            collect(engine, make_request(f"conc-{i}", max_tokens, token_ids=[*PROMPT, i]))
            for i in range(n)
        )
    )
    for outs in results:
        assert len(tokens(outs)) == max_tokens
        assert outs[-1].finish_reason == "length"
    assert engine.stats().max_batch_running > 1
    await settle(engine)


@module_loop
async def test_early_close_aborts_request(engine: VllmEngine) -> None:
    await settle(engine)
    before = engine.stats().generation_tokens_total
    stream = engine.generate(make_request("cancel-close", 1000))
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    # aborted by the time aclose() returns, not later when the garbage collector finalizes
    # vLLM's own stream (which would also abort it, but only eventually)
    assert engine._llm is not None
    assert engine._llm.get_num_unfinished_requests() == 0
    await settle(engine)  # KV blocks freed
    # dropped, not run to completion (the tiny model makes 1000 tokens in a few seconds)
    assert engine.stats().generation_tokens_total - before < 500


@module_loop
async def test_task_cancel_aborts_request(engine: VllmEngine) -> None:
    await settle(engine)
    before = engine.stats().generation_tokens_total
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(make_request("cancel-task", 1000)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(engine)
    assert engine.stats().generation_tokens_total - before < 500


@module_loop
async def test_kv_layout_comes_from_the_model_and_cache_config(
    engine: VllmEngine, model_path: str
) -> None:
    """What a vLLM decode worker advertises to prefill workers (disaggregation)."""
    hf = json.loads((Path(model_path) / "config.json").read_text())
    layout = engine.kv_layout()
    assert layout == {
        "num_layers": hf["num_hidden_layers"],
        "block_size": engine._llm.vllm_config.cache_config.block_size,  # type: ignore[union-attr]
        "num_kv_heads": hf["num_key_value_heads"],
        "head_dim": hf["head_dim"],
        "dtype": "float32",
    }
    KvLayout(**layout)  # the wire type takes it as it is


def test_unknown_engine_arg_rejected(model_path: str) -> None:
    with pytest.raises(EngineError, match="bogus_arg"):
        VllmEngine(model_path, {**ENGINE_ARGS, "bogus_arg": 1})
    # both spellings are accepted
    engine = VllmEngine(model_path, {"max-model-len": 512})
    assert engine.context_length == 512


def test_create_engine_rejects_bogus_before_starting(model_path: str) -> None:
    with pytest.raises(EngineError, match="bogus"):
        create_engine("vllm", model_path, {"enforce_eager": True, "bogus": 1})
    with pytest.raises(EngineError, match="bogus"):
        create_engine("vllm", model_path, {"engine_args": {"bogus": 1}})
    built = create_engine(
        "vllm", model_path, {"max-model-len": 256, "engine_args": {"enforce_eager": True}}
    )
    assert isinstance(built, VllmEngine) and built.context_length == 256


@module_loop
async def test_bad_model_path_is_engine_error(tmp_path: Path) -> None:
    engine = VllmEngine(str(tmp_path), {"enforce_eager": True})  # a folder without a model
    with pytest.raises(EngineError, match="failed to start"):
        await engine.start()


@module_loop
async def test_generate_before_start_is_engine_error(model_path: str) -> None:
    with pytest.raises(EngineError, match="before start"):
        await collect(VllmEngine(model_path, ENGINE_ARGS), make_request("early", 4))
