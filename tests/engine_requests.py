"""Building engine requests and reading engine outputs, for the engine tests."""

from __future__ import annotations

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
