"""Request migration: a stream whose worker dies goes on on another worker.

When the call to a worker fails because of the worker (its process died: the TCP connection
closed, NATS had no responder, it went silent; or it was draining), the request is sent
again, routed afresh, as a continuation: the prompt followed by every token generated so far,
``max_tokens`` and ``min_tokens`` reduced by as many, the same sampling settings and seed. The
client sees a pause, no error: no token is lost or repeated, and under greedy sampling the
continuation is token-identical to what the first worker would have produced (the new worker
computes the same KV, or loads it from a shared tier). At most ``migration_limit`` times per
request (0 turns it off). A failure that is the request's own (an engine error, an invalid
request) is never retried.

The runtime has already taken the failed instance out of routing (`InstanceWatcher.suspend`),
so the next choice is another worker. Sampled (non-greedy) continuations are valid samples
but not the ones the first worker would have drawn; repetition penalties see the generated
tokens as prompt tokens on the new worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec

from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_sdk.runtime.errors import (
    ErrorCode,
    NoInstancesError,
    RemoteError,
    StreamLostError,
)

log = logging.getLogger("dynamo.llm.migration")

EngineCall = Callable[[PreprocessedRequest], AsyncIterator[EngineOutput]]


@dataclass
class MigrationStats:
    """Totals of one pipeline, for metrics and tests."""

    migrations: int = 0  # continuations sent after a worker failed
    exhausted: int = 0  # requests that failed after ``migration_limit`` migrations


def worker_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is the worker's failure (retry elsewhere), not the request's own."""
    if isinstance(exc, StreamLostError | NoInstancesError):
        return True
    return isinstance(exc, RemoteError) and exc.code in (
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.UPSTREAM,
        ErrorCode.UNAVAILABLE,
    )


def continuation(request: PreprocessedRequest, generated: list[int]) -> PreprocessedRequest:
    """``request`` picked up after ``generated``: those tokens join the prompt, and the stop
    budget shrinks by as many (the caller checked that some is left)."""
    if not generated:
        return request
    n = len(generated)
    stop = msgspec.structs.replace(
        request.stop,
        max_tokens=request.stop.max_tokens - n,
        min_tokens=max(0, request.stop.min_tokens - n),
    )
    return msgspec.structs.replace(request, token_ids=request.token_ids + generated, stop=stop)


class Migrating:
    """An `EngineCall` that migrates streams whose worker failed (see module docstring)."""

    def __init__(self, call: EngineCall, limit: int, stats: MigrationStats | None = None) -> None:
        if limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {limit}")
        self.call = call
        self.limit = limit
        self.stats = stats or MigrationStats()

    def __call__(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        return self._stream(request)

    async def _stream(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        generated: list[int] = []
        cached_seen = False
        migrations = 0
        while True:
            stream = self.call(continuation(request, generated))
            try:
                async for out in stream:
                    if out.cached_tokens is not None:
                        if cached_seen:  # the continuation's prompt includes our own tokens
                            out.cached_tokens = None
                        cached_seen = True
                    generated += out.token_ids
                    yield out
                    if out.finish_reason is not None:
                        return
                return
            except Exception as exc:
                if not worker_failed(exc) or self.limit == 0:
                    raise
                if migrations >= self.limit:
                    self.stats.exhausted += 1
                    log.warning("request %s: worker failed after %d migrations: %s",
                                request.request_id, migrations, exc)  # fmt: skip
                    raise
                if len(generated) >= request.stop.max_tokens:
                    yield EngineOutput(token_ids=[], finish_reason="length")
                    return
                migrations += 1
                self.stats.migrations += 1
                # a moment for a worker that is re-subscribing (NATS came back) or for the
                # routing to learn of a death: 0.05, 0.1, 0.2 ... s, at most 1 s
                await asyncio.sleep(min(0.05 * 2 ** (migrations - 1), 1.0))
                log.warning("request %s: %s; continuing on another worker after %d tokens "
                            "(migration %d of %d)", request.request_id, exc, len(generated),
                            migrations, self.limit)  # fmt: skip
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
