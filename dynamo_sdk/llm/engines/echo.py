"""An engine with no model: it streams the prompt's own token ids back.

Serving, routing, cancellation and metrics are exercised end to end by tests and benchmarks
without loading weights, and the output is predictable (the latest chat message, or the whole
prompt of a completion, cycled), so a test can check that every token crossed every hop in
order. `token_delay` stands in for decode time so concurrency and streaming behave like a real
engine's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dynamo_sdk.llm.engines.base import (
    NO_OPTIONS,
    Engine,
    EngineStats,
    GenerateOptions,
    RequestLimits,
    check_request,
)
from dynamo_sdk.llm.engines.configs import EchoConfig, settings
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    FinishReason,
    PreprocessedRequest,
    TokenLogprob,
)


class EchoEngine(Engine):
    """Echoes prompt token ids, one per output, honouring the request's stop conditions."""

    def __init__(self, config: EchoConfig | None = None, **knobs: Any) -> None:
        config = config or settings(EchoConfig, knobs)
        self.context_length = config.context_length
        self.token_delay = config.token_delay
        self._running = 0
        self._max_running = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0

    async def start(self) -> None:
        """Nothing to load."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._running,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            max_batch_running=self._max_running,
        )

    async def generate(
        self, request: PreprocessedRequest, options: GenerateOptions = NO_OPTIONS
    ) -> AsyncIterator[EngineOutput]:
        """Yield the latest chat message's ids and then a stop id (a completion: the prompt's
        ids, cyclically) until max_tokens or a stop id (after min_tokens); with ``ignore_eos``
        the message repeats until max_tokens.

        `running` is decremented in `finally`, so a consumer that closes the stream early (a
        cancelled client) leaves the counters right, as a real engine's abort would.
        """
        check_request(request, RequestLimits(self.context_length))
        prompt, once = _echoed(request)
        stop = request.stop
        stop_ids = set() if stop.ignore_eos else set(stop.stop_token_ids)
        # A chat turn is answered with its latest message, then the first stop id, as a model
        # that is done would (so a reply is the message once, not the message repeated).
        if once and stop_ids:
            prompt = [*prompt, stop.stop_token_ids[0]]
        want_logprobs = request.output.logprobs is not None
        self._running += 1
        self._max_running = max(self._max_running, self._running)
        self._prompt_tokens += len(request.token_ids)
        try:
            if stop.max_tokens <= 0:
                # nothing to generate, but the stream must still end with a finish reason
                yield EngineOutput(token_ids=[], finish_reason="length", cached_tokens=0)
                return
            # like the engines with a model: the context length ends a stream too (else a
            # request's max_tokens alone, up to 2**31, would keep it streaming for hours)
            limit = min(stop.max_tokens, self.context_length - len(request.token_ids))
            for i in range(limit):
                if self.token_delay > 0:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)  # stay cooperative: other streams interleave
                token = prompt[i % len(prompt)]
                self._generation_tokens += 1
                generated = i + 1
                finish: FinishReason | None = None
                if token in stop_ids and generated > stop.min_tokens:
                    finish = "stop"
                elif generated >= limit:
                    finish = "length"
                out = EngineOutput(
                    token_ids=[token],
                    finish_reason=finish,
                    cached_tokens=0 if i == 0 else None,
                )
                if want_logprobs:
                    out.logprobs = [0.0]
                    out.top_logprobs = [[TokenLogprob(token, 0.0)]]
                yield out
                if finish is not None:
                    return
        finally:
            self._running -= 1


def _echoed(request: PreprocessedRequest) -> tuple[list[int], bool]:
    """What to echo, and whether it is a chat message (answered once): the latest message
    when the request says where it is, else the whole prompt (a chat turn answered with the
    first message of its history would be no echo)."""
    span = request.latest_message
    if span is not None and len(span) == 2 and 0 <= span[0] < span[1] <= len(request.token_ids):
        return request.token_ids[span[0] : span[1]], True
    return request.token_ids, False
