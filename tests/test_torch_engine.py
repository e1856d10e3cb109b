"""The torch engine on CPU (fp32, the tiny Llama): exactness against transformers, paged-KV
behaviour (prefix cache, chunked prefill, preemption, KV export/import), sampling, errors."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from dynamo_sdk.llm.engines.base import EngineError, GenerateOptions, PrefillSlots, RemotePrefill
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.kv.events import BlockStored, KvEvent
from dynamo_sdk.llm.kv.hashing import block_hashes_int
from dynamo_sdk.llm.protocol import PreprocessedRequest, SamplingOptions
from dynamo_sdk.llm.torch_engine.engine import TorchEngine
from tests.engine_requests import collect, make_request, tokens

GREEDY = SamplingOptions(temperature=0.0)
BS = 16


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' own forward pass, greedy, never stopping early (the reference)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        result = model(ids, use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(
                torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True
            )
    return out


def prompts(count: int, seed: int = 0, lo: int = 5, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 2048) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    eng = TorchEngine(str(model_dir), num_blocks=256, block_size=BS)
    await eng.start()
    yield eng
    await eng.shutdown()


async def greedy(engine: TorchEngine, prompt: list[int], n: int, rid: str = "r") -> list[int]:
    req = make_request(prompt, n, request_id=rid, ignore_eos=True, sampling=GREEDY)
    return tokens(await collect(engine, req))


async def test_greedy_single_request_matches_transformers(
    engine: TorchEngine, hf_model: torch.nn.Module
) -> None:
    prompt = prompts(1, seed=1, lo=40, hi=40)[0]
    assert await greedy(engine, prompt, 24) == hf_greedy(hf_model, prompt, 24)


async def test_greedy_8_concurrent_mixed_lengths_match_transformers(
    model_dir: Path, hf_model: torch.nn.Module
) -> None:
    # A 48-token step budget forces chunked prefill mixed with other sequences' decodes.
    eng = TorchEngine(str(model_dir), num_blocks=256, block_size=BS, max_num_batched_tokens=48)
    await eng.start()
    try:
        batch = prompts(8, seed=2, lo=3, hi=120)
        outs = await asyncio.gather(*[greedy(eng, p, 16, f"r{i}") for i, p in enumerate(batch)])
        assert eng.stats().max_batch_running >= 4
        for p, out in zip(batch, outs, strict=True):
            assert out == hf_greedy(hf_model, p, 16)
    finally:
        await eng.shutdown()


async def test_prefix_cache_hit_computes_only_the_last_block(engine: TorchEngine) -> None:
    prompt = prompts(1, seed=3, lo=70, hi=70)[0]  # 4 full blocks + 6 tokens
    first = await collect(engine, make_request(prompt, 8, ignore_eos=True, sampling=GREEDY))
    before = engine.computed_prompt_tokens
    second = await collect(engine, make_request(prompt, 8, ignore_eos=True, sampling=GREEDY))
    assert second[0].cached_tokens == 64 and first[0].cached_tokens == 0
    assert engine.computed_prompt_tokens - before == 6
    assert tokens(second) == tokens(first)
    assert engine.stats().prefix_cache_hit_rate == pytest.approx(64 / 140)


async def test_preemption_under_a_tiny_block_budget_keeps_greedy_outputs(
    model_dir: Path, hf_model: torch.nn.Module
) -> None:
    # 12 blocks of 16 tokens for 6 requests that each grow to 3-4 blocks: some must be preempted
    # and recomputed, and the outputs must not change.
    eng = TorchEngine(str(model_dir), num_blocks=12, block_size=BS, max_model_len=192)
    await eng.start()
    try:
        batch = prompts(6, seed=4, lo=20, hi=40)
        outs = await asyncio.gather(*[greedy(eng, p, 24, f"p{i}") for i, p in enumerate(batch)])
        assert eng.num_preemptions > 0
        for p, out in zip(batch, outs, strict=True):
            assert out == hf_greedy(hf_model, p, 24)
        assert eng.stats().kv_usage == 0
    finally:
        await eng.shutdown()


async def test_kv_export_import_round_trips_and_decode_continues(
    model_dir: Path, hf_model: torch.nn.Module
) -> None:
    prompt = prompts(1, seed=5, lo=75, hi=75)[0]
    source = TorchEngine(str(model_dir), num_blocks=64, block_size=BS)
    target = TorchEngine(str(model_dir), num_blocks=64, block_size=BS)
    await source.start()
    await target.start()
    try:
        reference = await greedy(source, prompt, 12)
        covered, kv = source.export_prefix(prompt)
        assert covered == 64 and kv.shape[2] == 4 and kv.is_contiguous()
        stored: list[KvEvent] = []
        target.kv_events().subscribe(stored.extend)
        assert target.import_prefix(prompt, kv.clone()) == 64
        assert [h for e in stored if isinstance(e, BlockStored) for h in e.block_hashes] == (
            block_hashes_int(prompt, BS)
        )
        again, kv_back = target.export_prefix(prompt)
        assert again == 64 and torch.equal(kv_back, kv)  # bit-exact
        outs = await collect(target, make_request(prompt, 12, ignore_eos=True, sampling=GREEDY))
        assert outs[0].cached_tokens == 64
        assert target.computed_prompt_tokens == len(prompt) - 64  # only the tail was computed
        assert tokens(outs) == reference == hf_greedy(hf_model, prompt, 12)
        with pytest.raises(EngineError, match="does not fit"):
            target.import_prefix(prompt[::-1], kv[:, :1].contiguous())  # one K/V plane only
        assert target.stats().kv_usage == 0
    finally:
        await source.shutdown()
        await target.shutdown()


async def test_imported_kv_is_used_not_recomputed(model_dir: Path) -> None:
    """Poisoned imported KV changes the output: the engine really reads imported blocks."""
    prompt = prompts(1, seed=6, lo=64 + 5, hi=64 + 5)[0]
    eng = TorchEngine(str(model_dir), num_blocks=64, block_size=BS)
    await eng.start()
    try:
        clean = await greedy(eng, prompt, 8)
        _, kv = eng.export_prefix(prompt)
        eng.reset_prefix_cache()
        eng.import_prefix(prompt, torch.randn_like(kv) * 5)
        assert await greedy(eng, prompt, 8) != clean
    finally:
        await eng.shutdown()


async def test_cancel_frees_blocks_at_once(engine: TorchEngine) -> None:
    stream = engine.generate(make_request(prompts(1, seed=7)[0], 200, ignore_eos=True))
    await anext(stream)
    assert engine.stats().kv_usage > 0
    await stream.aclose()  # type: ignore[attr-defined]
    stats = engine.stats()
    assert stats.running == 0 and stats.kv_usage == 0


async def test_kv_events_use_the_shared_block_hashes(model_dir: Path) -> None:
    events: list[KvEvent] = []
    eng = TorchEngine(str(model_dir), num_blocks=64, block_size=BS, on_events=events.extend)
    await eng.start()
    try:
        prompt = prompts(1, seed=8, lo=50, hi=50)[0]
        await greedy(eng, prompt, 4)
        stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
        assert stored == block_hashes_int(prompt, BS)  # 3 full blocks; the 4th never filled
        assert eng.load_metrics(1).total_blocks == 64
    finally:
        await eng.shutdown()


# -- sampling --------------------------------------------------------------------------------


async def sampled(engine: TorchEngine, prompt: list[int], **opts: float | int) -> list[int]:
    req = make_request(prompt, 24, ignore_eos=True, sampling=SamplingOptions(**opts))  # type: ignore[arg-type]
    return tokens(await collect(engine, req))


async def test_seed_makes_sampling_reproducible_in_any_batch(engine: TorchEngine) -> None:
    prompt = prompts(1, seed=9)[0]
    alone = await sampled(engine, prompt, temperature=1.5, seed=42)
    crowd = await asyncio.gather(
        sampled(engine, prompt, temperature=1.5, seed=42),
        *[sampled(engine, p, temperature=1.5) for p in prompts(4, seed=10)],
    )
    assert crowd[0] == alone
    assert await sampled(engine, prompt, temperature=1.5, seed=43) != alone


async def test_top_k_1_and_tiny_top_p_are_greedy(engine: TorchEngine) -> None:
    prompt = prompts(1, seed=11)[0]
    expected = await greedy(engine, prompt, 24)
    assert await sampled(engine, prompt, temperature=2.0, top_k=1) == expected
    assert await sampled(engine, prompt, temperature=2.0, top_p=1e-6) == expected
    assert await sampled(engine, prompt, temperature=2.0, min_p=0.999) == expected


async def test_presence_penalty_prevents_repeats(engine: TorchEngine) -> None:
    prompt = prompts(1, seed=12)[0]
    plain = await greedy(engine, prompt, 24)
    assert len(set(plain)) < len(plain)  # the random tiny model repeats itself
    penalized = await sampled(engine, prompt, temperature=0.0, presence_penalty=100.0)
    assert len(set(penalized)) == len(penalized)
    rep = await sampled(engine, prompt, temperature=0.0, repetition_penalty=100.0)
    assert rep != plain


async def test_logprobs_are_the_models_and_sorted(
    engine: TorchEngine, hf_model: torch.nn.Module
) -> None:
    prompt = prompts(1, seed=13)[0]
    outs = await collect(engine, make_request(prompt, 1, logprobs=3, sampling=GREEDY))
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, -1], dim=-1)
    (token,) = tokens(outs)
    assert outs[0].logprobs == [pytest.approx(float(ref[token]), abs=1e-4)]
    top = outs[0].top_logprobs[0]  # type: ignore[index]
    assert [t.token_id for t in top] == ref.topk(3).indices.tolist()
    assert top[0].token_id == token  # greedy picks the most likely


async def test_min_tokens_bans_stop_ids_and_stop_ids_stop(engine: TorchEngine) -> None:
    prompt = prompts(1, seed=14)[0]
    free = await greedy(engine, prompt, 12)
    stop_id = free[3]  # greedy would produce it at step 4 (maybe earlier too)
    first = free.index(stop_id)
    req = make_request(prompt, 12, stop_token_ids=[stop_id], sampling=GREEDY)
    out = await collect(engine, req)
    assert tokens(out) == free[: first + 1] and out[-1].finish_reason == "stop"
    req = make_request(prompt, 12, stop_token_ids=[stop_id], min_tokens=8, sampling=GREEDY)
    held = tokens(await collect(engine, req))
    assert stop_id not in held[:8]


# -- errors and config -----------------------------------------------------------------------


async def test_bad_requests_get_engine_errors(engine: TorchEngine) -> None:
    with pytest.raises(EngineError, match="vocabulary"):
        await collect(engine, make_request([5, 99999], 4))
    with pytest.raises(EngineError, match="context length"):
        await collect(engine, make_request([5] * engine.context_length, 4))


def test_registry_builds_torch_engine_and_rejects_unknown_keys(model_dir: Path) -> None:
    eng = create_engine("torch", str(model_dir), {"num_blocks": 32, "enforce_eager": True})
    assert isinstance(eng, TorchEngine) and eng.device.type == "cpu"
    with pytest.raises(EngineError, match="max_num_seq"):
        create_engine("torch", str(model_dir), {"max_num_seq": 4})
    with pytest.raises(EngineError, match="enforce_eager: expected `bool`"):
        create_engine("torch", str(model_dir), {"enforce_eager": "yes"})
    with pytest.raises(EngineError, match="needs a model"):
        create_engine("torch", None, {})
    with pytest.raises(EngineError, match="max_position_embeddings"):
        create_engine("torch", str(model_dir), {"max_model_len": 10**6})


async def test_decode_steps_launched_ahead_keep_outputs_exact(
    model_dir: Path, hf_model: torch.nn.Module
) -> None:
    """Async scheduling (the GPU default) exercised on CPU: the next decode step is planned
    and fed the running step's tokens before they reach the host. Outputs, stops, cancels and
    the KV cache must come out exactly as with one step at a time."""
    eng = TorchEngine(str(model_dir), num_blocks=128, block_size=BS)
    eng.launch_ahead_on_cpu = True
    events: list[KvEvent] = []
    eng.kv_events().subscribe(events.extend)
    await eng.start()
    try:
        batch = prompts(5, seed=15, lo=10, hi=60)
        refs = [hf_greedy(hf_model, p, 40) for p in batch]
        stop_at = refs[1][9]  # request 1 stops early, while the others run on
        requests = [make_request(p, 40, request_id=f"a{i}", ignore_eos=True, sampling=GREEDY)
                    for i, p in enumerate(batch)]  # fmt: skip
        requests[1] = make_request(batch[1], 40, request_id="a1", stop_token_ids=[stop_at],
                                   sampling=GREEDY)  # fmt: skip
        requests[2] = make_request(batch[2], 7, request_id="a2", ignore_eos=True, sampling=GREEDY)
        cancelled = eng.generate(make_request(batch[3], 40, ignore_eos=True, sampling=GREEDY))
        await anext(cancelled)
        outs = await asyncio.gather(*[collect(eng, r) for r in requests])
        await cancelled.aclose()  # type: ignore[attr-defined]
        assert eng.num_chained_steps > 20
        assert tokens(outs[0]) == refs[0]
        assert tokens(outs[1]) == refs[1][: refs[1].index(stop_at) + 1]
        assert outs[1][-1].finish_reason == "stop"
        assert tokens(outs[2]) == refs[2][:7]
        assert tokens(outs[4]) == refs[4]
        assert eng.stats().kv_usage == 0
        eng.block_manager.check_invariants()  # type: ignore[union-attr]
        # Every announced block holds the real tokens' hashes, never a placeholder's.
        stored = {h for e in events if isinstance(e, BlockStored) for h in e.block_hashes}
        for p, ref in ((batch[0], refs[0]), (batch[4], refs[4])):
            full = [*p, *ref[:-1]]  # the last sampled token is never computed
            assert set(block_hashes_int(full, BS)) <= stored
    finally:
        await eng.shutdown()


# -- disaggregation primitives ---------------------------------------------------------------


async def test_remote_prefill_fills_the_decode_engines_blocks(
    model_dir: Path, hf_model: torch.nn.Module
) -> None:
    """A decode engine hands its blocks to a prefill engine, which writes the prompt's KV into
    them; the decode engine computes only the tail and produces transformers' tokens."""
    decode = TorchEngine(str(model_dir), num_blocks=64, block_size=BS)
    prefill = TorchEngine(str(model_dir), num_blocks=64, block_size=BS)
    await decode.start()
    await prefill.start()
    try:
        prompt = prompts(1, seed=16, lo=70, hi=70)[0]

        async def remote(slots: PrefillSlots) -> int:
            first = slots.num_cached_tokens // slots.block_size
            req = make_request(prompt, 1, sampling=GREEDY)
            covered, kv = await prefill.prefill_and_export(req, first_block=first)
            decode.write_kv(slots.block_ids[first : -(-covered // slots.block_size)], kv)
            return covered

        req = make_request(prompt, 12, ignore_eos=True, sampling=GREEDY)
        outs = [o async for o in decode.generate(req, GenerateOptions(remote_prefill=remote))]
        assert tokens(outs) == hf_greedy(hf_model, prompt, 12)
        assert decode.computed_prompt_tokens == 1  # the last token alone: its logits
        assert prefill.computed_prompt_tokens == len(prompt)

        async def broken(slots: PrefillSlots) -> int:
            raise ConnectionError("prefill worker gone")

        decode.reset_prefix_cache()
        before = decode.computed_prompt_tokens
        outs = [o async for o in decode.generate(req, GenerateOptions(remote_prefill=broken))]
        assert tokens(outs) == hf_greedy(hf_model, prompt, 12)  # fell back to a local prefill
        assert decode.computed_prompt_tokens - before == len(prompt)

        stalled = asyncio.Event()

        async def hang(slots: PrefillSlots) -> int:
            stalled.set()
            await asyncio.Event().wait()
            return 0

        task = asyncio.create_task(_drain(decode, req, hang))
        await stalled.wait()
        assert decode.stats().kv_usage > 0  # the prompt's blocks are held for the transfer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert decode.stats().kv_usage == 0
        _, kv = prefill.export_prefix(prompt)
        with pytest.raises(EngineError, match="does not fit"):
            decode.write_kv([0], kv[:, :1, :1].contiguous())
    finally:
        await decode.shutdown()
        await prefill.shutdown()


async def _drain(engine: TorchEngine, req: PreprocessedRequest, remote: RemotePrefill) -> None:
    async for _ in engine.generate(req, GenerateOptions(remote_prefill=remote)):
        pass
