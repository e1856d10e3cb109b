"""The engine contract: what a Processor sends a Worker, and what streams back.

Every engine (vLLM, echo, the project's own, a mocker) takes a `PreprocessedRequest` (token
ids plus sampling and stop settings) and yields `EngineOutput` deltas: the new token ids since
the last output, their logprobs when asked for, and a finish reason on the last one. Text never
crosses this boundary; tokenizing and detokenizing are the Processor's job, so engines stay
interchangeable and the Frontend and Processor never change when one is added.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from dynamo_sdk.llm.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest

FinishReason = Literal["stop", "length", "cancelled", "error"]


class SamplingOptions(msgspec.Struct, omit_defaults=True):
    temperature: float | None = None  # None: engine default (1.0); 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class StopConditions(msgspec.Struct, omit_defaults=True):
    max_tokens: int  # resolved by the Processor: never None here
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []  # stop when generated (EOS ids included here unless ignore_eos)


class OutputOptions(msgspec.Struct, omit_defaults=True):
    logprobs: int | None = None  # number of top logprobs per token (0 = only the sampled one)


class PreprocessedRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    model: str
    token_ids: list[int]
    stop: StopConditions
    sampling: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    output: OutputOptions = msgspec.field(default_factory=OutputOptions)
    # [start, end) of the latest chat message's content in token_ids, when known (what the
    # echo engine repeats); engines that compute are free to ignore it
    latest_message: list[int] | None = None


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class EngineOutput(msgspec.Struct, omit_defaults=True):
    """A delta: tokens generated since the previous output of the same request."""

    token_ids: list[int]
    # per new token: its own logprob, and the top-k alternatives (when logprobs were asked for)
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: FinishReason | None = None
    # set on the first output: how many prompt tokens the engine found already cached
    cached_tokens: int | None = None
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
