"""What crosses a process boundary inside the graph is validated where it lands.

* Workers: a `PreprocessedRequest` from NATS (anyone on it can call a worker directly) is
  bounded when decoded, and checked against the served model (vocabulary, context length,
  ``max_logprobs``); the caller gets an ``invalid_request`` error frame that says why, and
  the worker serves the next request.
* Engines: one bad request fails alone. The torch engine once failed for good on a
  ``logprobs`` past the vocabulary (reachable over NATS); now it refuses it at admission,
  and a row that still cannot be sampled (the check bypassed here) fails its own request
  while the batch it shared goes on, and so does a failed forward pass. The mocker and the
  echo engine likewise.
* Disaggregation: a transfer id names a storage folder only through its hash, so no id can
  name a path outside the decode worker's transfer folders; prefill jobs and transfer headers
  are bounded.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dynamo_sdk.llm.disagg.kv_storage import (
    StorageKeyError,
    instance_dir,
    is_storage_key,
    remove_stored,
    storage_key,
    sweep_own,
    transfer_path,
)
from dynamo_sdk.llm.disagg.protocol import KvLayout, RemotePrefillRequest, TransferHeader
from dynamo_sdk.llm.engines.base import (
    EngineError,
    InvalidPromptError,
    RequestLimits,
    check_request,
)
from dynamo_sdk.llm.engines.echo import EchoEngine
from dynamo_sdk.llm.engines.mocker import MockerEngine
from dynamo_sdk.llm.engines.scheduler import Scheduler, Sequence
from dynamo_sdk.llm.kv.block_manager import BlockManager
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
)
from dynamo_sdk.llm.worker.config import worker_config
from dynamo_sdk.llm.worker.worker import LLMWorker, model_vocab_size
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.runtime.errors import ErrorCode, RemoteError
from tests.engine_requests import collect, make_request, tokens, wire

GREEDY = SamplingOptions(temperature=0.0)


def decode(data: bytes) -> PreprocessedRequest:
    return msgspec.msgpack.decode(data, type=PreprocessedRequest)


# -- the wire: PreprocessedRequest's bounds ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"sampling__temperature": -5.0}, "sampling.temperature"),
        ({"sampling__temperature": float("nan")}, "sampling.temperature"),
        ({"sampling__temperature": float("inf")}, "sampling.temperature"),
        ({"sampling__top_p": 0.0}, "sampling.top_p"),
        ({"sampling__top_p": 1.5}, "sampling.top_p"),
        ({"sampling__top_k": -2}, "sampling.top_k"),
        ({"sampling__top_k": 2**40}, "sampling.top_k"),
        ({"sampling__min_p": 2.0}, "sampling.min_p"),
        ({"sampling__seed": 2**64 - 1}, "sampling.seed"),
        ({"sampling__repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"sampling__presence_penalty": float("-inf")}, "sampling.presence_penalty"),
        ({"sampling__frequency_penalty": 1e300}, "sampling.frequency_penalty"),
        ({"output__logprobs": 10_000_000}, "output.logprobs"),
        ({"output__logprobs": -1}, "output.logprobs"),
        ({"stop__max_tokens": 0}, "stop.max_tokens"),
        ({"stop__max_tokens": 2**40}, "stop.max_tokens"),
        ({"stop__min_tokens": -1}, "stop.min_tokens"),
        ({"stop__stop_token_ids": [-1]}, "stop.stop_token_ids"),
        ({"stop__stop_token_ids": list(range(2000))}, "stop.stop_token_ids"),
        ({"token_ids": [5, -3]}, "token_ids"),
        ({"token_ids": [5, 2**40]}, "token_ids"),
        ({"token_ids": []}, "token_ids"),
        ({"latest_message": [0, 1, 2]}, "latest_message"),
        ({"request_id": "r" * 10_000}, "request_id"),
    ],
)
def test_decoding_refuses_out_of_bounds_fields(change: dict[str, Any], where: str) -> None:
    request = make_request([5, 6, 7], 4)
    assert decode(wire(request)) == request
    with pytest.raises(msgspec.ValidationError, match=f"\\$.{where}"):
        decode(wire(request, **change))


def test_decoding_takes_every_value_the_frontend_sends() -> None:
    sampling = SamplingOptions(temperature=2.0, top_p=1.0, top_k=-1, min_p=0.0, seed=-(2**63),
                               repetition_penalty=2.0, presence_penalty=-2.0,
                               frequency_penalty=2.0)  # fmt: skip
    request = make_request([0, 5, 2**31 - 1], 1, logprobs=20, sampling=sampling, min_tokens=1)
    assert decode(wire(request)) == request


# -- the model's bounds: check_request ------------------------------------------------------


LIMITS = RequestLimits(context_length=64, vocab_size=32000, max_logprobs=20)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (make_request([5, 70000], 4), "token id 70000 outside the vocabulary \\(32000\\)"),
        (make_request([5, -1], 4), "token id -1 outside the vocabulary"),
        (make_request([5], 4, stop_token_ids=[32000]), "stop token id 32000 outside"),
        (make_request([5] * 64, 4), "context length 64"),
        (make_request([5], 4, logprobs=21), "logprobs 21 is more than the maximum 20"),
        (make_request([5], 4, min_tokens=5), "min_tokens 5 is larger than max_tokens 4"),
        (make_request([5], 4, sampling=SamplingOptions(temperature=-5.0)), "temperature"),
        (make_request([5], 4, sampling=SamplingOptions(seed=2**64)), "seed"),
        (make_request([5], 2**40), "max_tokens"),
    ],
)
def test_requests_the_model_cannot_serve_are_refused(
    request_: PreprocessedRequest, message: str
) -> None:
    with pytest.raises(InvalidPromptError, match=f"invalid request r: .*{message}"):
        check_request(request_, LIMITS)
    assert InvalidPromptError.code is ErrorCode.INVALID_REQUEST


def test_logprobs_are_bounded_by_the_vocabulary_without_a_worker_limit() -> None:
    check_request(make_request([5], 4, logprobs=100), RequestLimits(64, vocab_size=100))
    with pytest.raises(InvalidPromptError, match="maximum 100"):
        check_request(make_request([5], 4, logprobs=101), RequestLimits(64, vocab_size=100))


def test_the_worker_reads_the_vocabulary_of_its_model(tmp_path: Path, model_dir: Path) -> None:
    assert model_vocab_size(str(model_dir)) == 2048
    (tmp_path / "config.json").write_text('{"text_config": {"vocab_size": 262144}}')
    assert model_vocab_size(str(tmp_path)) == 262144
    assert model_vocab_size(str(tmp_path / "missing")) == 0 and model_vocab_size(None) == 0


def test_max_logprobs_is_a_worker_setting_shared_with_vllm() -> None:
    assert worker_config({"engine": "mocker"}).keys.max_logprobs == 20
    assert worker_config({"engine": "mocker", "max_logprobs": 5}).keys.max_logprobs == 5
    vllm = worker_config({"engine": "vllm", "max_logprobs": 7})
    assert vllm.keys.max_logprobs == 7
    assert vllm.engine.engine_args.get("max_logprobs", 7) == 7  # type: ignore[attr-defined]
    nested = worker_config({"engine": "vllm", "engine_args": {"max_logprobs": 9}})
    assert nested.keys.max_logprobs == 9


# -- over NATS: a worker answers a hostile direct call with a clear error frame ---------------


@pytest.fixture
async def served_worker(
    runtime: DistributedRuntime, unique_ns: str, model_dir: Path
) -> AsyncIterator[tuple[LLMWorker, Any]]:
    """A mocker-engine LLMWorker for the tiny model (vocabulary 2048) behind a real
    endpoint, and a client that calls it directly, past any Frontend."""
    worker = LLMWorker(worker_config({"engine": "mocker", "model": str(model_dir),
                                      "max_logprobs": 5}))  # fmt: skip
    await worker.start(runtime, unique_ns, "Worker", "generate")
    await runtime.serve_endpoint(
        unique_ns, "Worker", "generate", worker.generate, request_type=PreprocessedRequest
    )
    client = runtime.endpoint_client(unique_ns, "Worker", "generate", EngineOutput)
    yield worker, client
    await worker.stop()


async def call(client: Any, request: Any) -> list[EngineOutput]:
    return [out async for out in client(request)]


async def test_a_worker_refuses_hostile_requests_with_an_invalid_request_frame(
    served_worker: tuple[LLMWorker, Any],
) -> None:
    _, client = served_worker
    good = make_request([5, 6, 7], 4, ignore_eos=True)
    hostile: list[tuple[Any, str]] = [
        (make_request([5, 70000], 4), "token id 70000 outside the vocabulary (2048)"),
        (make_request([5, 2047, 2048], 4), "token id 2048 outside the vocabulary (2048)"),
        (make_request([5], 4, logprobs=6), "logprobs 6 is more than the maximum 5"),
        (make_request([5] * 9000, 4), "does not fit the context length"),
        (make_request([5], 4, sampling=SamplingOptions(temperature=-5)), "$.sampling.temp"),
        (make_request([5], 4, logprobs=5_000_000), "$.output.logprobs"),
        (make_request([-1], 4), "$.token_ids"),
    ]
    for request, message in hostile:
        with pytest.raises(RemoteError) as info:
            await call(client, request)
        assert info.value.code is ErrorCode.INVALID_REQUEST, info.value
        assert message in info.value.remote_message, info.value
    outs = await call(client, good)  # and the worker serves on
    assert len(tokens(outs)) == 4 and outs[-1].finish_reason == "length"


# -- the torch engine: one bad request does not fail the engine ------------------------------


@pytest.fixture
async def torch_engine(model_dir: Path) -> AsyncIterator[Any]:
    from dynamo_sdk.llm.torch_engine.engine import TorchEngine

    eng = TorchEngine(str(model_dir), num_blocks=128, block_size=16)
    await eng.start()
    yield eng
    await eng.shutdown()


PROMPT = [7, 99, 1500, 3, 42, 800, 11, 1024, 5]


async def test_the_torch_engine_refuses_logprobs_past_its_vocabulary(torch_engine: Any) -> None:
    with pytest.raises(InvalidPromptError, match="logprobs 2049 is more than the maximum 2048"):
        await collect(torch_engine, make_request(PROMPT, 4, logprobs=2049))
    with pytest.raises(InvalidPromptError, match="stop token id 4096 outside"):
        await collect(torch_engine, make_request(PROMPT, 4, stop_token_ids=[4096], min_tokens=2))
    assert len(tokens(await collect(torch_engine, make_request(PROMPT, 4, ignore_eos=True)))) == 4


async def test_a_row_that_cannot_be_sampled_fails_alone_and_the_engine_serves_on(
    torch_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's reproducer, past the engine's own check: ``logprobs`` above the
    vocabulary, next to a good greedy request and a seeded sampled one in the same steps.
    The bad one fails; the others complete exactly as they do alone; the engine serves on."""
    greedy_req = make_request(PROMPT, 12, request_id="good", ignore_eos=True, sampling=GREEDY)
    seeded = SamplingOptions(temperature=1.0, seed=1234)
    seeded_req = make_request(PROMPT[::-1], 12, request_id="seeded", ignore_eos=True,
                              sampling=seeded)  # fmt: skip
    alone = [tokens(await collect(torch_engine, r)) for r in (greedy_req, seeded_req)]

    import dynamo_sdk.llm.torch_engine.engine as engine_module

    monkeypatch.setattr(engine_module, "check_request", lambda request, limits: None)
    bad = make_request(PROMPT, 12, request_id="bad", logprobs=torch_engine.vocab_size + 100)
    results = await asyncio.gather(
        collect(torch_engine, bad),
        collect(torch_engine, greedy_req),
        collect(torch_engine, seeded_req),
        return_exceptions=True,
    )
    assert isinstance(results[0], EngineError)
    assert "request bad: sampling failed" in str(results[0]), results[0]
    assert [tokens(r) for r in results[1:]] == alone  # type: ignore[arg-type]
    assert torch_engine._failure is None
    again = await collect(torch_engine, greedy_req)
    assert tokens(again) == alone[0]
    assert torch_engine.block_manager.num_active_blocks == 0  # the failed request's freed


async def test_a_failed_forward_pass_fails_its_requests_not_the_engine(
    torch_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = torch_engine.runner
    real_launch = runner.launch
    failures = {"left": 1}

    def flaky(*args: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("device fault (injected)")
        return real_launch(*args)

    monkeypatch.setattr(runner, "launch", flaky)
    with pytest.raises(EngineError, match="step failed: RuntimeError: device fault"):
        await collect(torch_engine, make_request(PROMPT, 4, request_id="unlucky"))
    outs = await collect(torch_engine, make_request(PROMPT, 4, ignore_eos=True))
    assert len(tokens(outs)) == 4 and torch_engine.num_failed_steps == 1
    assert torch_engine._failure is None and torch_engine.healthy()
    # a device that keeps failing is broken: the engine gives up, loudly, and says so to the
    # worker's liveness probe (the supervisor then restarts the worker)
    failures["left"] = 100
    for _ in range(3):
        with pytest.raises(EngineError):
            await collect(torch_engine, make_request(PROMPT, 4))
    assert torch_engine._failure is not None and not torch_engine.healthy()


def test_the_worker_service_probes_its_engine_for_liveness() -> None:
    from dynamo_sdk import service_of
    from dynamo_sdk.llm.services.worker import Worker

    assert "alive" in service_of(Worker).hooks.get("liveness", [])


# -- the mocker and the echo engine -----------------------------------------------------------


async def test_the_mocker_refuses_what_it_cannot_serve_and_isolates_a_failing_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eng = MockerEngine(vocab_size=1000, speedup=1000.0)
    await eng.start()
    try:
        with pytest.raises(InvalidPromptError, match="logprobs 5000 is more than the maximum 1000"):
            await collect(eng, make_request([1, 2, 3], 4, logprobs=5000))
        with pytest.raises(InvalidPromptError, match="token id -5 outside"):
            await collect(eng, make_request([1, -5], 4))
        real = eng._top_logprobs

        def boom(token: int, logprob: float, k: int) -> Any:
            if k == 3:
                raise RuntimeError("one request's fault")
            return real(token, logprob, k)

        monkeypatch.setattr(eng, "_top_logprobs", boom)
        bad, good = await asyncio.gather(
            collect(eng, make_request([1, 2, 3], 8, logprobs=3)),
            collect(eng, make_request([1, 2, 3], 8, logprobs=2, ignore_eos=True)),
            return_exceptions=True,
        )
        assert isinstance(bad, EngineError) and "one request's fault" in str(bad)
        assert len(tokens(good)) == 8  # type: ignore[arg-type]
        assert eng._failure is None
        assert len(tokens(await collect(eng, make_request([4, 5], 3, ignore_eos=True)))) == 3
    finally:
        await eng.shutdown()


async def test_the_echo_engine_ends_at_its_context_length() -> None:
    eng = EchoEngine(context_length=16)
    outs = await collect(eng, make_request([1, 2, 3, 4], 2**31 - 1, ignore_eos=True))
    assert len(tokens(outs)) == 12 and outs[-1].finish_reason == "length"
    with pytest.raises(InvalidPromptError, match="token id -4 outside"):
        await collect(eng, make_request([1, -4], 3))


def test_a_request_that_can_never_fit_fails_alone() -> None:
    """A sequence longer than the whole cache (a prompt an engine let through, or one grown
    past the cache before it was preempted) fails; the queue behind it is served."""
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, context_length=1000)
    huge = Sequence("huge", make_request(list(range(40)), 1), 40, list(range(40)), frozenset())
    small = Sequence("small", make_request([1, 2], 1), 2, [1, 2], frozenset())
    sched.add(huge)
    sched.add(small)
    work = sched.schedule()
    assert [c.seq.seq_id for c in work] == ["small"]
    error = huge.outputs._items[0]
    assert isinstance(error, EngineError) and "need 10 KV blocks; the cache has 4" in str(error)


# -- disaggregation: storage keys, prefill jobs, transfer headers -----------------------------

HOSTILE_IDS = ["..", ".", "../x", "a/../../b", "\x00", "x" * 10_000, "", "/etc/passwd",
               "\ud800", "a\\..\\b", "~", "con", "1/.."]  # fmt: skip


@pytest.mark.parametrize("transfer_id", HOSTILE_IDS)
def test_no_transfer_id_names_a_path_outside_its_folder(tmp_path: Path, transfer_id: str) -> None:
    instance = 0x1A2B
    key = storage_key(instance, transfer_id)
    assert is_storage_key(key)
    folder, name = key.split("/")
    assert folder == instance_dir(instance) and len(name) == 64
    path = transfer_path(tmp_path, key)
    assert path.resolve().parent == (tmp_path / folder).resolve()
    # deleting that key deletes that transfer's folder and nothing else
    mine = tmp_path / folder
    neighbour = mine / ("0" * 64)
    neighbour.mkdir(parents=True)
    other_worker = tmp_path / "ffff"
    other_worker.mkdir()
    (tmp_path / "keep.txt").write_text("x")
    path.mkdir()
    assert remove_stored(tmp_path, key)
    assert not path.exists()
    assert neighbour.is_dir() and other_worker.is_dir() and (tmp_path / "keep.txt").exists()


def test_distinct_transfer_ids_never_share_a_folder() -> None:
    keys = {storage_key(1, t) for t in HOSTILE_IDS}
    assert len(keys) == len(set(HOSTILE_IDS))


@pytest.mark.parametrize("key", ["1/..", "../x", "1/../../b", "/etc", "1", "1/a", "zz/" + "0" * 64,
                                 "1/" + "0" * 64 + "/..", "1/" + "0" * 63 + "\x00"])  # fmt: skip
def test_only_storage_keys_are_deleted(tmp_path: Path, key: str) -> None:
    (tmp_path / "1").mkdir()
    with pytest.raises(StorageKeyError):
        remove_stored(tmp_path, key)
    assert (tmp_path / "1").is_dir()


def test_instance_folders_are_lease_ids_only() -> None:
    for bad in (0, -1, 2**63):
        with pytest.raises(StorageKeyError):
            instance_dir(bad)
        with pytest.raises(StorageKeyError):
            storage_key(bad, "t")


def test_sweeping_keeps_only_real_keys_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    root = tmp_path / "root"
    mine = root / instance_dir(1)
    mine.mkdir(parents=True)
    (mine / ("a" * 64)).symlink_to(outside, target_is_directory=True)
    old = time.time() - 600
    stale = mine / ("b" * 64)
    stale.mkdir()
    os.utime(stale, (old, old))
    assert sweep_own(root, 1, {"1/..", "../outside"}, min_age=60) == 1
    assert (outside / "precious").exists() and not stale.exists()


def test_prefill_jobs_and_transfer_headers_are_bounded() -> None:
    job = RemotePrefillRequest(make_request([1, 2, 3], 1), 0x1A, [4, 5], 1, "cmpl-1:abc")
    data = msgspec.structs.asdict(job)
    data["request"] = msgspec.to_builtins(job.request)

    def decodes(**changes: Any) -> None:
        msgspec.msgpack.decode(msgspec.msgpack.encode({**data, **changes}),
                               type=RemotePrefillRequest)  # fmt: skip

    decodes()
    for changes in ({"first_block": 3}, {"block_ids": [-1]}, {"transfer_id": "t" * 10_000},
                    {"transfer_id": ""}, {"decode_instance": -1}, {"kind": "pickle"}):  # fmt: skip
        with pytest.raises(msgspec.ValidationError):
            decodes(**changes)
    layout = KvLayout(2, 4, 2, 8, "bfloat16")
    header = msgspec.structs.asdict(TransferHeader("t", [1], layout, 4))
    header["layout"] = msgspec.structs.asdict(layout)
    for changes in ({"num_tokens": -1}, {"nbytes": -1}, {"error": "e" * 100_000},
                    {"block_ids": [2**40]}):  # fmt: skip
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(msgspec.msgpack.encode({**header, **changes}),
                                   type=TransferHeader)  # fmt: skip


async def test_a_receiver_refuses_more_tokens_than_the_offered_blocks_hold() -> None:
    import torch

    from dynamo_sdk.llm.disagg.transfer import KvReceiver, TransferError, send_kv

    layout = KvLayout(2, 4, 2, 8, "bfloat16")
    receiver = KvReceiver(layout, lambda ids, kv: None)
    endpoint = await receiver.start()
    try:
        done = receiver.expect("t1", [3, 4])
        kv = torch.zeros((2, 2, 2, 4, 2, 8), dtype=torch.bfloat16)
        with pytest.raises(TransferError, match="9 tokens for 2 blocks"):
            await send_kv(endpoint, TransferHeader("t1", [3, 4], layout, num_tokens=9), kv)
        assert await done == 0
    finally:
        await receiver.stop()


def test_output_options_default() -> None:
    assert OutputOptions().logprobs is None
