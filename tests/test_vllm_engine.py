"""VllmEngine against a real vLLM (CPU) serving the tiny test model.

Starting vLLM costs tens of seconds, so one engine is shared by the whole module, on one
module-scoped event loop (AsyncLLM's output handler task lives on the loop that started it).
The tests of vLLM's CPU memory defaults start engines (and one graph) of their own, without
VLLM_CPU_KVCACHE_SPACE: that is what a new user runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
import yaml

from dynamo_sdk.llm.disagg.protocol import KvLayout
from dynamo_sdk.llm.engines.base import EngineError
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.engines.vllm_engine import (
    CPU_KV_CACHE_GIB,
    CPU_KVCACHE_ENV,
    VllmEngine,
    _cpu_available_memory,
    _on_cpu_platform,
    cpu_memory_args,
)
from dynamo_sdk.llm.protocol import (
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_sdk.llm.testing.tiny_model import build_tiny_model
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.engine_requests import collect, tokens
from tests.serving import REPO_ROOT, ServeProcess, wait_until_serving

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
GIB = 1 << 30


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
    assert layout == KvLayout(
        num_layers=hf["num_hidden_layers"],
        block_size=engine.kv_block_size(),
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"],
        dtype="float32",
    )
    assert engine.kv_block_size() == engine._llm.vllm_config.cache_config.block_size  # type: ignore[union-attr]


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


# vLLM's CPU memory defaults (vLLM 0.32 alone wants 92% of the memory free) and its shutdown.


def test_cpu_memory_args_size_the_kv_cache_unless_the_user_did() -> None:
    free = 20 * GIB
    assert cpu_memory_args({}, {}, free) == {"kv_cache_memory_bytes": CPU_KV_CACHE_GIB * GIB}
    # a small machine: half of what is free, in whole MiB
    assert cpu_memory_args({}, {}, 3 * GIB + 12345) == {"kv_cache_memory_bytes": 1536 << 20}
    # what the user chose stays: vLLM applies each itself
    assert cpu_memory_args({}, {CPU_KVCACHE_ENV: "1"}, free) == {}
    assert cpu_memory_args({"kv_cache_memory_bytes": GIB}, {}, free) == {}
    assert cpu_memory_args({"gpu_memory_utilization": 0.2}, {}, free) == {}


def test_effective_engine_args_on_cpu(model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _on_cpu_platform():
        pytest.skip("vLLM's CPU platform only")
    monkeypatch.delenv(CPU_KVCACHE_ENV, raising=False)
    args = VllmEngine(model_path, ENGINE_ARGS).effective_engine_args()
    kv_bytes = args["kv_cache_memory_bytes"]
    assert 0 < kv_bytes <= min(CPU_KV_CACHE_GIB * GIB, _cpu_available_memory())
    assert "gpu_memory_utilization" not in args
    assert {k: args[k] for k in ENGINE_ARGS} == ENGINE_ARGS
    given = {**ENGINE_ARGS, "gpu_memory_utilization": 0.2}
    args = VllmEngine(model_path, given).effective_engine_args()
    assert args["gpu_memory_utilization"] == 0.2 and "kv_cache_memory_bytes" not in args
    monkeypatch.setenv(CPU_KVCACHE_ENV, "1")
    assert (
        "kv_cache_memory_bytes" not in VllmEngine(model_path, ENGINE_ARGS).effective_engine_args()
    )


def _vllm_processes() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@module_loop
async def test_cpu_defaults_start_and_shutdown_keeps_the_loop_running(
    model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No memory settings at all: vLLM starts; its shutdown is bounded and off the loop."""
    if not _on_cpu_platform():
        pytest.skip("vLLM's CPU platform only")
    monkeypatch.delenv(CPU_KVCACHE_ENV, raising=False)
    before = _vllm_processes()
    engine = VllmEngine(model_path, ENGINE_ARGS)
    try:
        await engine.start()
        assert engine._llm is not None
        kv_bytes = engine._llm.vllm_config.cache_config.kv_cache_memory_bytes
        assert kv_bytes is not None and 0 < kv_bytes <= CPU_KV_CACHE_GIB * GIB
        assert len(tokens(await collect(engine, make_request("defaults", 4)))) == 4
    except BaseException:
        await engine.shutdown()
        raise
    ours = _vllm_processes() - before
    assert ours, "vLLM's engine-core processes"

    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            t = loop.time()
            await asyncio.sleep(0.02)
            gaps.append(loop.time() - t)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.1)
    started = loop.time()
    await engine.shutdown()
    took = loop.time() - started
    done.set()
    await ticker
    # vLLM kills its engine core after stop_timeout; the rest is bookkeeping
    assert took < engine.stop_timeout + 3.0, took
    # the worker's event loop went on (etcd keep-alives, NATS, health probes) meanwhile
    assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.1f} s of {took:.1f} s"
    assert not [pid for pid in ours if _alive(pid)], "vLLM processes left after shutdown"
    await engine.shutdown()  # idempotent


@pytest.mark.timeout(420)
def test_serve_vllm_graph_without_memory_settings_and_ctrl_c(
    servers: EmbeddedServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`configs/agg_vllm.yaml` without its VLLM_CPU_KVCACHE_SPACE: it serves, Ctrl-C drains."""
    monkeypatch.delenv(CPU_KVCACHE_ENV, raising=False)  # the graph inherits this environment
    config = yaml.safe_load((REPO_ROOT / "configs" / "agg_vllm.yaml").read_text())
    config["Worker"]["ServiceArgs"].pop("envs", None)
    path = tmp_path / "agg_vllm_defaults.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    serve = ServeProcess(
        ["graphs.agg:Frontend", "-f", str(path), f"--Frontend.port={port}"],
        cwd=REPO_ROOT,
        env=servers.env(),
        log_path=tmp_path / "serve.log",
    )
    try:
        body = {
            "model": config["Common"]["served_model_name"],
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
        wait_until_serving(serve, f"http://127.0.0.1:{port}/v1/chat/completions", body, 240)
        started = time.monotonic()
        code = serve.interrupt(timeout=60)
        took = time.monotonic() - started
    finally:
        serve.stop()
    out = serve.output()
    assert code == 0, out[-3000:]
    assert "did not exit" not in out, out[-3000:]
    assert "vLLM engine stopped" in out
    assert took < 10.0, f"Ctrl-C took {took:.1f} s, more than the 10 s grace:\n{out[-3000:]}"
