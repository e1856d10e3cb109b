"""Building engine requests and reading engine outputs, for the engine tests."""

from __future__ import annotations

from typing import Any

import msgspec

from dynamo_sdk.llm.engines.base import Engine
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)


def make_request(
    token_ids: list[int],
    max_tokens: int,
    *,
    request_id: str = "r",
    min_tokens: int = 0,
    stop_token_ids: list[int] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    model: str = "test",
    sampling: SamplingOptions | None = None,
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=request_id,
        model=model,
        token_ids=token_ids,
        stop=StopConditions(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            stop_token_ids=stop_token_ids or [],
        ),
        output=OutputOptions(logprobs=logprobs),
        sampling=sampling or SamplingOptions(),
    )


async def collect(engine: Engine, request: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


def tokens(outputs: list[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def wire(request: PreprocessedRequest, **changes: Any) -> bytes:
    """``request`` as a hostile caller would send it (msgpack), any field set to anything:
    ``sampling__temperature=-5`` reaches into nested structs."""
    body = msgspec.to_builtins(request)
    for path, value in changes.items():
        node = body
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return msgspec.msgpack.encode(body)
