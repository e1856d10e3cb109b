"""The engine contract: what every engine does, and what an engine may also offer.

An engine takes `PreprocessedRequest`s (token ids, sampling, stop rules; see
`dynamo_sdk.llm.protocol`) and streams `EngineOutput` deltas; closing the stream aborts the
request. That is the whole required surface: `start`, `generate`, `stats`, `shutdown`.

Everything else the LLM worker can use is an optional capability, declared here as a method
whose default says "not supported"; an engine overrides the ones it has:

* `kv_events()`: its KV cache events (blocks stored / removed), for the KV-aware router, and
  `kv_block_size()`: the tokens per block those events hash (the router hashes prompts alike);
* `load_metrics()`: the load snapshot the router weighs (default: made from `stats()`);
* `cached_prefix_tokens()`: how many leading prompt tokens are cached (the disaggregation
  rule counts only the rest; default: none known); `stored_prefix_tokens()` also asks shared
  storage (a round trip) before a prompt is sent to a remote prefill;
* `kv_port()`: direct access to its paged KV blocks (layout, export / import of prefixes,
  writes into given blocks, prefill-and-export), what block transfers between workers are
  built on;
* `kv_connector()`: KV the engine moves itself through a connector (vLLM's), for engines whose
  blocks cannot be reached from outside.

The worker asks an engine what it has; nothing outside the engines probes with `hasattr` or
checks engine classes.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from dynamo_sdk.llm.kv.events import KvEvent, KvEventCallback, LoadMetrics
from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats
from dynamo_sdk.llm.protocol import (
    I32_MAX,
    MAX_STOP_TOKEN_IDS,
    EngineOutput,
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
)
from dynamo_sdk.runtime.errors import CodedError, ErrorCode
from dynamo_sdk.sdk.errors import ConfigurationError


class EngineStats(msgspec.Struct):
    """A snapshot for logs and Prometheus; engines fill what they know."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_hit_rate: float = 0.0  # fraction of queried prompt tokens found cached
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    max_batch_running: int = 0  # the most requests seen running in one step
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the device prefix cache
    prefix_hit_tokens: int = 0  # ... and found there
    kv_tiers: list[KvTierStats] = msgspec.field(default_factory=list)  # host, disk, shared


class EngineError(CodedError):
    """An engine failed to start or to serve a request."""


class EngineConfigError(EngineError, ConfigurationError):
    """An engine's settings are invalid (an unknown key, a wrong type, an impossible size)."""

    code = ErrorCode.INVALID_REQUEST


class InvalidPromptError(EngineError):
    """A request the engine cannot take as it is (empty, too long, ids outside the vocabulary)."""

    code = ErrorCode.INVALID_REQUEST


@dataclass
class PrefillSlots:
    """Where a prompt's KV must land when a prefill worker computes it (disaggregation)."""

    block_ids: list[int]  # the decode engine's blocks for the whole prompt, in order
    num_cached_tokens: int  # leading tokens already cached locally: their blocks need nothing
    block_size: int


RemotePrefill = Callable[[PrefillSlots], Awaitable[int]]
"""Gets a prompt's KV written into ``PrefillSlots``; returns how many leading tokens' KV is
there now (0 if the prefill failed: the engine then computes the prompt itself)."""


@dataclass(frozen=True)
class GenerateOptions:
    """What a request may carry besides itself: how its prefill is done elsewhere.

    `remote_prefill` is for engines with a `kv_port()`: the engine allocates the prompt's
    blocks and has them filled by a prefill worker first. `kv_transfer_params` go to the KV
    connector of an engine with a `kv_connector()` (vLLM's per-request channel to it), and
    `on_kv_transfer` gets what the connector reports back when the request finishes.
    """

    remote_prefill: RemotePrefill | None = None
    kv_transfer_params: dict[str, Any] | None = None
    on_kv_transfer: Callable[[dict[str, Any]], None] | None = None


NO_OPTIONS = GenerateOptions()


class KvEventSource(Protocol):
    """Where an engine's KV events can be followed."""

    def subscribe(self, callback: KvEventCallback | None, *, replay: bool = False) -> None: ...


class KvPort(Protocol):
    """Direct access to an engine's paged KV cache (tensors are PyTorch tensors)."""

    def kv_layout(self) -> KvLayout:
        """What a block of this cache looks like (peers check it before sending)."""
        ...

    def kv_cache_tensor(self) -> Any:
        """The whole cache, ``[layers, 2, blocks + 1, block_size, kv_heads, head_dim]``."""
        ...

    def write_kv(self, block_ids: list[int], kv: Any) -> None:
        """Write transferred KV (``export`` layout) into ``block_ids``."""
        ...

    def export_prefix(self, token_ids: list[int]) -> tuple[int, Any]:
        """The cached KV of the longest full-block prefix: (tokens covered, buffer)."""
        ...

    def import_prefix(self, token_ids: list[int], kv: Any) -> int:
        """Put exported KV for a prefix in the prefix cache; the tokens now cached."""
        ...

    async def prefill_and_export(
        self, request: PreprocessedRequest, first_block: int = 0
    ) -> tuple[int, Any]:
        """Compute a prompt's KV here and read it out: (tokens covered, KV of its blocks
        ``first_block``.. , every prompt token but the last)."""
        ...


class KvConnector(Protocol):
    """KV an engine moves itself, through a connector that stores it in shared storage."""

    @property
    def storage_root(self) -> str:
        """The folder every worker of the graph reads and writes KV in."""
        ...

    def kv_layout(self) -> KvLayout: ...


class Engine(abc.ABC):
    """An LLM engine: token ids in, token id deltas out, cancellable (see module docstring)."""

    context_length: int
    stop_timeout: float = 0.0  # seconds `shutdown()` may take at most (a drain reserves them)
    # token ids it can take: below this (its embedding table's rows); 0 when the engine does
    # not know (the worker then reads the model's config.json)
    vocab_size: int = 0

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights, allocate caches. Called once before the first request."""

    @abc.abstractmethod
    def generate(
        self, request: PreprocessedRequest, options: GenerateOptions = NO_OPTIONS
    ) -> AsyncIterator[EngineOutput]:
        """Stream deltas. Closing the iterator early aborts the request (frees its KV)."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load and totals (cheap; called several times a second)."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the engine."""

    # -- optional capabilities -----------------------------------------------------------

    def healthy(self) -> bool:
        """False once the engine cannot serve any request again (it failed for good): the
        worker's liveness probe, so the supervisor restarts it instead of leaving a
        registered worker that fails everything routed to it."""
        return True

    def kv_events(self) -> KvEventSource | None:
        """Its KV cache events, if it can report them."""
        return None

    def kv_snapshot(self) -> list[KvEvent] | None:
        """Its whole KV state as events (`kv/resync.py`), for a router that lost track; None
        if it cannot list its cache (vLLM's prefix cache has no such API)."""
        return None

    def kv_block_size(self) -> int:
        """Tokens per KV block (what its KV events hash); 0 when it has no paged cache."""
        return 0

    def load_metrics(self, worker_id: int) -> LoadMetrics:
        """The load snapshot a worker publishes for the router."""
        stats = self.stats()
        return LoadMetrics(worker_id, stats.kv_usage, 0, 0, stats.running, stats.waiting)

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading prompt tokens whose KV is cached here (0 when the engine cannot tell)."""
        return 0

    async def stored_prefix_tokens(self, token_ids: list[int]) -> int:
        """`cached_prefix_tokens` plus what it could load from storage it must ask first
        (shared KV storage: a round trip), for decisions worth that wait."""
        return self.cached_prefix_tokens(token_ids)

    def kv_port(self) -> KvPort | None:
        """Direct access to its KV blocks, if it has them."""
        return None

    def kv_connector(self) -> KvConnector | None:
        """Its KV connector, if it moves KV itself."""
        return None


def check_prompt(request: PreprocessedRequest, context_length: int) -> None:
    """The checks every engine makes before admitting a request (a clear error, not a hang)."""
    if not request.token_ids:
        raise InvalidPromptError(f"invalid request {request.request_id}: empty prompt")
    if len(request.token_ids) >= context_length:
        raise InvalidPromptError(
            f"invalid request {request.request_id}: prompt of {len(request.token_ids)} tokens "
            f"does not fit the context length {context_length}"
        )


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask of one served model: the bounds that depend on the model or on
    the worker's settings, which wire decoding (`protocol.py`'s constraints) cannot know."""

    context_length: int
    vocab_size: int = 0  # token ids must be below it; 0: unknown (then not checked)
    max_logprobs: int | None = None  # the most logprobs per token; None: up to vocab_size


def check_request(request: PreprocessedRequest, limits: RequestLimits) -> None:
    """Refuse, with an ``InvalidPromptError`` (an ``invalid_request`` error for the caller),
    a request the model cannot serve as it is.

    Workers call it on what they decode and engines again at admission: an engine is also
    called in-process (tests, benchmarks, `dynamo run`) with structs no decoder checked, and
    one bad value (a token id past the embedding table, ``logprobs`` past the vocabulary, an
    infinite penalty) must fail its own request, never the engine's step for everyone. So the
    small option structs are re-validated against `protocol.py`'s constraints here (a few
    fields; the prompt's ids are only scanned for their smallest and largest).
    """
    check_prompt(request, limits.context_length)
    rid = request.request_id
    for part, kind in ((request.sampling, SamplingOptions), (request.output, OutputOptions)):
        try:
            msgspec.convert(msgspec.structs.asdict(part), kind)
        except msgspec.ValidationError as exc:
            raise InvalidPromptError(f"invalid request {rid}: {exc}") from None
    stop = request.stop
    # in-process callers may ask for 0 tokens (one empty, finished output); the wire may not
    if not (0 <= stop.max_tokens <= I32_MAX and 0 <= stop.min_tokens <= I32_MAX):
        raise InvalidPromptError(
            f"invalid request {rid}: max_tokens {stop.max_tokens} / min_tokens "
            f"{stop.min_tokens} out of range"
        )
    if len(stop.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidPromptError(
            f"invalid request {rid}: more than {MAX_STOP_TOKEN_IDS} stop token ids"
        )
    vocab = limits.vocab_size
    ids = request.token_ids
    low, high = min(ids), max(ids)
    if low < 0 or high > I32_MAX or (vocab and high >= vocab):
        bad = low if low < 0 else high
        raise InvalidPromptError(_outside_vocab(rid, bad, vocab))
    for t in stop.stop_token_ids:
        if t < 0 or t > I32_MAX or (vocab and t >= vocab):
            raise InvalidPromptError(_outside_vocab(rid, t, vocab, "stop token id"))
    if stop.min_tokens > stop.max_tokens:
        raise InvalidPromptError(
            f"invalid request {rid}: min_tokens {stop.min_tokens} is larger than max_tokens "
            f"{stop.max_tokens}"
        )
    logprobs = request.output.logprobs
    if logprobs is not None:
        most = limits.max_logprobs
        if vocab and (most is None or most > vocab):
            most = vocab
        if most is not None and logprobs > most:
            raise InvalidPromptError(
                f"invalid request {rid}: logprobs {logprobs} is more than the maximum {most}"
            )


def _outside_vocab(rid: str, token: int, vocab: int, what: str = "token id") -> str:
    size = f" ({vocab})" if vocab else ""
    return f"invalid request {rid}: {what} {token} outside the vocabulary{size}"
