"""The interface every engine implements; see `dynamo_sdk.llm.protocol` for the data."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgspec

from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest


class EngineStats(msgspec.Struct):
    """A snapshot for logs and Prometheus; engines fill what they know."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_hit_rate: float = 0.0  # fraction of queried prompt tokens found cached
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    max_batch_running: int = 0  # the most requests seen running in one step


@runtime_checkable
class Engine(Protocol):
    """An LLM engine: token ids in, token id deltas out, cancellable."""

    context_length: int

    async def start(self) -> None:
        """Load weights, allocate caches. Called once before the first request."""

    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        """Stream deltas. Closing the iterator early aborts the request (frees its KV)."""
        ...

    def stats(self) -> EngineStats:
        """Current load and totals (cheap; called several times a second)."""
        ...

    async def shutdown(self) -> None:
        """Release the engine."""


class EngineError(Exception):
    """An engine failed to start or to serve a request."""


def check_prompt(request: PreprocessedRequest, context_length: int) -> None:
    """The checks every engine makes before admitting a request (a clear error, not a hang)."""
    if not request.token_ids:
        raise EngineError(f"request {request.request_id}: empty prompt")
    if len(request.token_ids) >= context_length:
        raise EngineError(
            f"request {request.request_id}: prompt of {len(request.token_ids)} tokens does not "
            f"fit the context length {context_length}"
        )


@dataclass
class PrefillSlots:
    """Where a prompt's KV must land when a prefill worker computes it (disaggregation)."""

    block_ids: list[int]  # the decode engine's blocks for the whole prompt, in order
    num_cached_tokens: int  # leading tokens already cached locally: their blocks need nothing
    block_size: int


RemotePrefill = Callable[[PrefillSlots], Awaitable[int]]
"""Gets a prompt's KV written into ``PrefillSlots``; returns how many leading tokens' KV is
there now (0 if the prefill failed: the engine then computes the prompt itself)."""
