"""The interface every engine implements; see `dynamo_sdk.llm.protocol` for the data."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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


def engine_kwargs(
    init: Callable[..., Any], config: Mapping[str, Any], engine: str, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """An engine's keyword arguments from a YAML mapping, checked against ``init``'s signature.

    Unknown keys are errors, so a typo cannot fall back silently to a default. Values are
    coerced to the default's type (YAML may give ``1`` for ``1.0``); booleans must be real
    booleans, since ``bool("false")`` is True; parameters defaulting to None take any value.
    """
    params = inspect.signature(init).parameters
    defaults = {n: p.default for n, p in params.items() if n not in ("self", *skip)}
    defaults = {n: d for n, d in defaults.items() if d is not inspect.Parameter.empty}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise EngineError(
            f"unknown {engine} engine config key(s): {', '.join(unknown)} "
            f"(known: {', '.join(sorted(defaults))})"
        )
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        default = defaults[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise EngineError(f"{engine}: {key} must be true or false, got {value!r}")
            kwargs[key] = value
        elif default is None or isinstance(value, list):
            kwargs[key] = value
        else:
            try:
                kwargs[key] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise EngineError(
                    f"{engine}: {key} must be of type {type(default).__name__}, got {value!r}"
                ) from exc
    return kwargs


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
