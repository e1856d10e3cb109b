"""The engine contract: what a Processor sends a Worker, and what streams back.

Every engine (vLLM, echo, the project's own, a mocker) takes a `PreprocessedRequest` (token
ids plus sampling and stop settings) and yields `EngineOutput` deltas: the new token ids since
the last output, their logprobs when asked for, and a finish reason on the last one. Text never
crosses this boundary; tokenizing and detokenizing are the Processor's job, so engines stay
interchangeable and the Frontend and Processor never change when one is added.

A worker decodes `PreprocessedRequest` from NATS, where anyone who reaches the server can send
one straight to it, past the Frontend's checks. So every field is bounded here, with msgspec
constraints that decoding enforces (a value outside them is a `msgspec.ValidationError`, which
the endpoint returns to the caller as an `invalid_request` error frame): ints to the widths the
engines' tensors use, floats finite and in their meaningful ranges, lists to a length. What
depends on the served model (token ids below its vocabulary size, the prompt inside its
context, logprobs up to the worker's maximum) is checked by the worker and the engines
(`engines/base.py:check_request`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from dynamo_sdk.llm.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest

FinishReason = Literal["stop", "length", "cancelled", "error"]

I32_MAX = 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_PROMPT_TOKENS = 1 << 24  # a wire bound only: the worker holds prompts to its context length
MAX_STOP_TOKEN_IDS = 1024
MAX_REQUEST_ID = 512  # characters; the Frontend's ids are about 45
MAX_MODEL_NAME = 1024
MAX_LOGPROBS_WIRE = 1 << 20  # the worker's `max_logprobs` (default 20) is the real limit
MAX_TEMPERATURE = 100.0  # the OpenAI edge allows 2; far past that sampling is uniform anyway
MAX_REPETITION_PENALTY = 100.0
MAX_PENALTY = 100.0  # presence / frequency: OpenAI's edge allows +-2; a finite bound past it

TokenId = Annotated[int, Meta(ge=0, le=I32_MAX)]
"""A token id as it crosses the wire: engines index int32/int64 tensors with it; the worker
also checks it against the served model's vocabulary."""
Count = Annotated[int, Meta(ge=0, le=I32_MAX)]


class SamplingOptions(msgspec.Struct, omit_defaults=True):
    # None: engine default (1.0); 0 = greedy
    temperature: Annotated[float, Meta(ge=0.0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1, le=I32_MAX)] | None = None  # -1 and 0: off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Meta(ge=I64_MIN, le=I64_MAX)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=MAX_REPETITION_PENALTY)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)] | None = None


class StopConditions(msgspec.Struct, omit_defaults=True):
    max_tokens: Annotated[int, Meta(ge=1, le=I32_MAX)]  # resolved by the Processor
    min_tokens: Count = 0
    ignore_eos: bool = False
    # stop when generated (EOS ids included here unless ignore_eos)
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] = []


class OutputOptions(msgspec.Struct, omit_defaults=True):
    # number of top logprobs per token (0 = only the sampled one)
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS_WIRE)] | None = None


class PreprocessedRequest(msgspec.Struct, omit_defaults=True):
    request_id: Annotated[str, Meta(max_length=MAX_REQUEST_ID)]
    model: Annotated[str, Meta(max_length=MAX_MODEL_NAME)]
    token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    stop: StopConditions
    sampling: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    output: OutputOptions = msgspec.field(default_factory=OutputOptions)
    # [start, end) of the latest chat message's content in token_ids, when known (what the
    # echo engine repeats); engines that compute are free to ignore it
    latest_message: Annotated[list[Count], Meta(min_length=2, max_length=2)] | None = None


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: TokenId
    logprob: float


class EngineOutput(msgspec.Struct, omit_defaults=True):
    """A delta: tokens generated since the previous output of the same request."""

    token_ids: list[TokenId]
    # per new token: its own logprob, and the top-k alternatives (when logprobs were asked for)
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: FinishReason | None = None
    # set on the first output: how many prompt tokens the engine found already cached
    cached_tokens: Count | None = None
    error: str | None = None


def merge_outputs(outputs: list[EngineOutput]) -> EngineOutput:
    """Consecutive deltas of one request as one (what a consumer that fell behind takes)."""
    if len(outputs) == 1:
        return outputs[0]
    merged = EngineOutput(token_ids=[t for out in outputs for t in out.token_ids])
    if any(out.logprobs is not None for out in outputs):
        merged.logprobs = [lp for out in outputs for lp in out.logprobs or []]
    if any(out.top_logprobs is not None for out in outputs):
        merged.top_logprobs = [top for out in outputs for top in out.top_logprobs or []]
    merged.finish_reason = outputs[-1].finish_reason
    merged.cached_tokens = next((o.cached_tokens for o in outputs if o.cached_tokens is not None),
                                None)  # fmt: skip
    merged.error = next((o.error for o in outputs if o.error is not None), None)
    return merged


class ModelEntry(msgspec.Struct):
    """What a worker registers in etcd under `models/{name}:{instance}` for the Frontend."""

    name: str
    namespace: str
    component: str
    endpoint: str
    context_length: int
    path: str = ""  # the model folder: its tokenizer, for a Frontend that tokenizes ("" = none)
    kv_block_size: int = 0  # tokens per KV block its events hash (0: no paged KV cache)
    kv_events: bool = False  # it publishes KV events and load: the KV router can follow it


# ---- Frontend ↔ Processor ------------------------------------------------------------------


class ProcessorRequest(msgspec.Struct, omit_defaults=True):
    """An OpenAI request, validated by the Frontend, on its way to a Processor service:
    exactly one of ``chat`` and ``completion``."""

    request_id: str
    chat: ChatCompletionRequest | None = None
    completion: CompletionRequest | None = None

    @property
    def body(self) -> OpenAIRequest:
        body = self.chat or self.completion
        assert body is not None, "a ProcessorRequest carries a chat or a completion"
        return body

    @classmethod
    def of(cls, request_id: str, body: OpenAIRequest) -> ProcessorRequest:
        if isinstance(body, ChatCompletionRequest):
            return cls(request_id, chat=body)
        return cls(request_id, completion=body)


class TopLogprob(msgspec.Struct, array_like=True):
    token: str
    logprob: float


class LogprobEntry(msgspec.Struct, array_like=True):
    token: str
    logprob: float
    top: list[TopLogprob] = []


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TextDelta(msgspec.Struct, omit_defaults=True):
    """New text since the previous delta; the last one carries finish_reason and usage."""

    text: str = ""
    token_count: int = 0
    logprobs: list[LogprobEntry] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
