"""Request migration (`dynamo_sdk/llm/migration.py`): what a continuation asks for, when a
stream is retried, and that the client's stream has every token exactly once.

The engine calls here are generators standing in for routed worker streams (the failures are
the runtime's own exception types); the served end to end case, a worker SIGKILLed
mid-stream, is `test_migration_serve.py`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dynamo_sdk.llm.migration import Migrating, continuation, worker_failed
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from dynamo_sdk.runtime.errors import (
    ErrorCode,
    InstanceNotFoundError,
    NoInstancesError,
    RemoteError,
    StreamLostError,
)


def request(max_tokens: int = 10, min_tokens: int = 0) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r",
        model="m",
        token_ids=[1, 2, 3],
        stop=StopConditions(max_tokens=max_tokens, min_tokens=min_tokens),
        sampling=SamplingOptions(temperature=0.0, seed=7),
    )


class Workers:
    """Each call is served by the next worker: it counts on from the prompt's last token
    (a deterministic "model": the continuation must produce the same tokens), and fails with
    its exception after ``fail_after`` tokens, if it has one."""

    def __init__(self, *plans: tuple[int, BaseException | None]) -> None:
        self.plans = list(plans)
        self.requests: list[PreprocessedRequest] = []
        self.closed = 0

    def __call__(self, req: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(req)
        fail_after, exc = self.plans.pop(0) if self.plans else (10**9, None)
        return self._stream(req, fail_after, exc)

    async def _stream(
        self, req: PreprocessedRequest, fail_after: int, exc: BaseException | None
    ) -> AsyncIterator[EngineOutput]:
        try:
            last = req.token_ids[-1]
            for i in range(req.stop.max_tokens):
                if i == fail_after and exc is not None:
                    raise exc
                done = i == req.stop.max_tokens - 1
                yield EngineOutput(
                    token_ids=[last + i + 1],
                    cached_tokens=len(req.token_ids) - 1 if i == 0 else None,
                    finish_reason="length" if done else None,
                )
                await asyncio.sleep(0)
        finally:
            self.closed += 1


async def collect(call: Migrating, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in call(req)]


def tokens(outputs: list[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


LOST = StreamLostError("the connection from instance 1 closed mid-stream")


def test_a_continuation_carries_the_generated_tokens_and_the_rest_of_the_budget() -> None:
    req = request(max_tokens=10, min_tokens=4)
    cont = continuation(req, [9, 8, 7])
    assert cont.token_ids == [1, 2, 3, 9, 8, 7]
    assert (cont.stop.max_tokens, cont.stop.min_tokens) == (7, 1)
    assert cont.sampling == req.sampling and cont.request_id == req.request_id
    assert req.token_ids == [1, 2, 3] and req.stop.max_tokens == 10  # the original untouched
    assert continuation(req, []) is req


async def test_a_stream_whose_worker_dies_goes_on_with_every_token_once() -> None:
    unbroken = tokens(await collect(Migrating(Workers(), 3), request()))
    workers = Workers((4, LOST), (2, LOST))
    call = Migrating(workers, 3)
    outputs = await collect(call, request())
    assert tokens(outputs) == unbroken == list(range(4, 14))
    assert outputs[-1].finish_reason == "length"
    assert [len(r.token_ids) for r in workers.requests] == [3, 7, 9]
    assert [r.stop.max_tokens for r in workers.requests] == [10, 6, 4]
    assert call.stats.migrations == 2 and workers.closed == 3
    # cached tokens are the first worker's: later ones count the stream's own tokens
    assert [o.cached_tokens for o in outputs if o.cached_tokens is not None] == [2]


@pytest.mark.parametrize(
    "failure",
    [
        LOST,
        NoInstancesError("no instance is listening (NATS no responders)"),
        InstanceNotFoundError("instance 1 is not live"),
        RemoteError(
            "dynamo/Worker/generate", "ShuttingDownError", "draining", ErrorCode.SHUTTING_DOWN
        ),
    ],
)
async def test_failures_of_the_worker_are_migrated(failure: BaseException) -> None:
    assert worker_failed(failure)
    outputs = await collect(Migrating(Workers((0, failure)), 3), request(max_tokens=3))
    assert tokens(outputs) == [4, 5, 6]


@pytest.mark.parametrize(
    "failure",
    [
        RemoteError(
            "dynamo/Worker/generate", "ValueError", "bad token id", ErrorCode.INVALID_REQUEST
        ),
        RemoteError("dynamo/Worker/generate", "RuntimeError", "engine failed"),
        RuntimeError("a bug here"),
    ],
)
async def test_failures_of_the_request_are_not_retried(failure: BaseException) -> None:
    assert not worker_failed(failure)
    workers = Workers((2, failure))
    with pytest.raises(type(failure)):
        await collect(Migrating(workers, 3), request())
    assert len(workers.requests) == 1


async def test_the_limit_bounds_the_migrations_and_zero_turns_them_off() -> None:
    workers = Workers((1, LOST), (1, LOST), (1, LOST))
    call = Migrating(workers, 2)
    with pytest.raises(StreamLostError):
        await collect(call, request())
    assert len(workers.requests) == 3 and call.stats.exhausted == 1

    off = Workers((1, LOST))
    with pytest.raises(StreamLostError):
        await collect(Migrating(off, 0), request())
    assert len(off.requests) == 1
    with pytest.raises(ValueError):
        Migrating(off, -1)


class _NoFinish(Workers):
    async def _stream(
        self, req: PreprocessedRequest, fail_after: int, exc: BaseException | None
    ) -> AsyncIterator[EngineOutput]:
        for i in range(req.stop.max_tokens):
            yield EngineOutput(token_ids=[req.token_ids[-1] + i + 1])
        raise LOST


async def test_a_full_budget_lost_before_its_finish_reason_ends_with_length() -> None:
    outputs = await collect(Migrating(_NoFinish(), 3), request(max_tokens=3))
    assert tokens(outputs) == [4, 5, 6]
    assert outputs[-1].finish_reason == "length"
