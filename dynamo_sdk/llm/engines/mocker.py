"""A simulated vLLM with no model: real scheduling and KV bookkeeping, fake compute.

Routing, disaggregation and planning depend on how an engine *behaves under load* (queueing,
batching, prefix-cache hits, KV pressure, preemption), not on what it writes. The mocker keeps
exactly those parts of vLLM and drops the model, so dozens of workers fit on one CPU and a
benchmark or test sees realistic TTFT/ITL shapes, KV events and load metrics:

* A paged KV cache (`BlockManager`, with prefix caching) that emits the same `BlockStored` /
  `BlockRemoved` events a vLLM worker would, so the KV-aware router can be driven by it.
* The shared continuous-batching `Scheduler` (`engines/scheduler.py`, also the torch engine's):
  FIFO admission under a token budget, chunked prefill, cached prefixes not recomputed,
  preemption by recomputation when blocks run out.

Timing model (milliseconds of simulated GPU time for one step, i.e. one forward pass)::

    prefill_ms = sum over prefill chunks of
                     n * prefill_ms_per_token + prefill_ms_quadratic * n * ctx
                 (n = tokens computed in the chunk, ctx = context length at the chunk's end:
                  attention makes long prompts super-linear)
    decode_ms  = decode_ms_per_seq * B + decode_ms_per_ctx_token * C
                 (B = decoding sequences, C = their total context: KV reads grow with context)
    step_ms    = decode_ms_base + prefill_ms + decode_ms

`decode_ms_base` is the fixed cost of any forward pass (kernel launches, sampling), so even a
fully cached prompt costs about one decode step to its first token, as on a GPU. The scheduler
really sleeps `step_ms / 1000 / speedup` seconds, so `speedup` compresses time uniformly for
tests. It also advances a simulated clock by `step_ms`; `simulated_ttft_ms()` reads TTFTs on that
clock, which, unlike wall-clock time, does not depend on how busy the host CPU is.

KV tiers (``host_kv_gb`` ... ``shared_kv``, as on the torch engine) are the real tier stack:
the same host index, disk files, shared folder or Redis, the same events. Only a block's bytes
are left out (its records carry an empty payload) and a load's time is simulated: per tier,
``*_kv_latency_ms`` plus the blocks' ``kv_bytes_per_block`` at ``*_kv_gbps``, charged on the
simulated clock (time the host spent on the real, tiny I/O is not charged). The same model
decides whether a disk or shared block is worth reading at all (`kv/tiers/costs.py`): at the
defaults a shared block (2.2 ms) costs more than recomputing it (0.8 ms), so it is recomputed.

Generated tokens are pseudo-random but deterministic: token `i` of a request is a hash of
(`seed`, prompt, `i`) modulo `vocab_size`, so equal prompts give equal outputs (good for cache
and routing tests) while different prompts diverge. A generated id in `stop_token_ids` stops the
request (after `min_tokens`), as in vLLM; `ignore_eos` needs no handling here because the
Processor already leaves EOS ids out of `stop_token_ids` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_sdk.llm.engines.base import (
    NO_OPTIONS,
    Engine,
    EngineError,
    EngineStats,
    GenerateOptions,
    RequestLimits,
    check_request,
)
from dynamo_sdk.llm.engines.configs import MockerConfig, settings
from dynamo_sdk.llm.engines.scheduler import (
    ScheduledChunk,
    Scheduler,
    SeqState,
    Sequence,
    stream_outputs,
)
from dynamo_sdk.llm.engines.tiering import (
    TierOnboarder,
    cached_prefix_tokens,
    stored_prefix_tokens,
    tier_plan,
)
from dynamo_sdk.llm.kv.block_manager import BlockManager
from dynamo_sdk.llm.kv.events import KvEvent, KvEventCallback, KvEventFanout, LoadMetrics
from dynamo_sdk.llm.kv.resync import snapshot_events
from dynamo_sdk.llm.kv.tiers.costs import ModelLoadCosts
from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity
from dynamo_sdk.llm.kv.tiers.stack import DISK, HOST, SHARED, LoadPlan, TierStack
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest, TokenLogprob

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
_TTFT_HISTORY = 4096  # simulated TTFTs kept for `simulated_ttft_ms` (oldest dropped first)


def vocab_size_of(model_dir: str | Path) -> int | None:
    """The ids a model's tokenizer can decode: the smaller of its ``tokenizer.json``
    vocabulary (added tokens included) and ``config.json``'s ``vocab_size`` (embedding tables
    are often padded past the tokenizer); None when the folder says neither."""
    folder = Path(model_dir)
    sizes: list[int] = []
    try:
        config = json.loads((folder / "config.json").read_text())
        if isinstance(config.get("vocab_size"), int):
            sizes.append(config["vocab_size"])
    except (OSError, ValueError, AttributeError):
        pass
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            sizes.append(Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size())
        except Exception:  # an unreadable tokenizer: fall back to config.json alone
            log.debug("cannot read %s/tokenizer.json", folder, exc_info=True)
    return min(sizes) if sizes else None


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash of a counter."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


@dataclass(eq=False)
class _Seq(Sequence):
    """A scheduler sequence plus what the mocker needs to fake its tokens and time it."""

    key: int = 0  # hash of (seed, prompt): the root of this request's token stream
    arrival_ms: float = 0.0  # on the simulated clock


class _NoBytes:
    """The mocker's `KvBlockIO`: blocks without bytes (their records are headers only)."""

    block_nbytes = 0

    def device_to_host(self, block_ids: list[int], slots: list[int]) -> None:
        pass

    def host_to_device(self, slots: list[int], block_ids: list[int]) -> None:
        pass

    def read_slot(self, slot: int) -> bytes:
        return b""

    def slot_buffer(self, slot: int) -> memoryview:
        return memoryview(bytearray(0))


class MockerEngine(Engine):
    """A model-free engine with vLLM's scheduling, paged KV cache and timing shape.

    Its knobs are `MockerConfig`'s (KV cache size, scheduler limits, the timing model,
    `speedup`, the output's `seed` and `vocab_size`), given as the config object or as keyword
    arguments. `vocab_size` 0 means the served model's tokenizer's when a model folder is
    given (32,000 without one). `on_events` receives the block manager's KV events (also
    reachable through `kv_events()`).
    """

    def __init__(
        self,
        config: MockerConfig | None = None,
        *,
        model: str | None = None,
        on_events: KvEventCallback | None = None,
        **knobs: Any,
    ) -> None:
        config = config or settings(MockerConfig, knobs)
        self.config = config
        self.context_length = config.context_length
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.prefill_ms_per_token = config.prefill_ms_per_token
        self.prefill_ms_quadratic = config.prefill_ms_quadratic
        self.decode_ms_base = config.decode_ms_base
        self.decode_ms_per_seq = config.decode_ms_per_seq
        self.decode_ms_per_ctx_token = config.decode_ms_per_ctx_token
        self.speedup = config.speedup
        self.seed = config.seed
        self.vocab_size = config.vocab_size or (vocab_size_of(model) if model else None) or 32000
        self.model_name = Path(model).name if model else "mocker"
        self.tier_plan = tier_plan(config, config.kv_bytes_per_block, config.num_blocks)
        self.tiers: TierStack | None = None
        self._kv_events = KvEventFanout("mocker")
        self._kv_events.subscribe(on_events)
        self.block_manager = BlockManager(
            config.num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            on_events=self._kv_events.publish,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            context_length=config.context_length,
        )
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: EngineError | None = None
        self._next_id = 0
        # the simulated clock and the step in flight (to place arrivals inside a step)
        self._clock_ms = 0.0
        self._step_ms = 0.0
        self._step_started: float | None = None
        self._ttft: OrderedDict[str, float] = OrderedDict()
        # totals
        self._prompt_tokens = 0
        self.num_steps = 0
        """Forward passes simulated so far."""
        self.computed_prompt_tokens = 0
        """Prompt (and re-prefill) tokens actually computed: prefix-cache hits excluded."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the scheduler task (idempotent)."""
        if self._task is None:
            self._failure = None
            if self.tier_plan.enabled and self.tiers is None:
                self._start_tiers()
            self._task = asyncio.create_task(self._loop(), name="mocker-scheduler")

    def _start_tiers(self) -> None:
        identity = LayoutIdentity(
            model=f"mocker:{self.model_name}",
            dtype="none",
            block_size=self.block_size,
            num_layers=0,
            num_kv_heads=0,
            head_dim=0,
        )
        stack = TierStack(
            self.tier_plan,
            identity,
            _NoBytes(),
            self._kv_events.publish,
            block_bytes=self.config.kv_bytes_per_block,
            costs=self._load_costs(),
        )
        stack.bind_loop(asyncio.get_running_loop())
        self.tiers = stack
        self.block_manager.tiers = stack
        self.scheduler.onboarder = TierOnboarder(
            stack, self.scheduler, self._wakeup.set, delay=self._simulate_load
        )
        stack.announce()

    async def _simulate_load(
        self, seq: Sequence, plan: LoadPlan, loaded: int, real_s: float
    ) -> None:
        """Charge a load's simulated time: wait out what the real load did not take, and keep
        host I/O time (real, tiny, not what a GPU would see) off the simulated clock."""
        sim_ms = self._load_ms(plan, loaded)
        real_ms = real_s * 1000 * self.speedup
        if real_ms < sim_ms:
            started = self._now_ms() - real_ms
            await asyncio.sleep((sim_ms - real_ms) / 1000 / self.speedup)
            if self._step_started is None:  # idle meanwhile: the clock moves by the load
                self._clock_ms = max(self._clock_ms, started + sim_ms)
        elif isinstance(seq, _Seq):
            seq.arrival_ms += real_ms - sim_ms

    def _load_costs(self) -> ModelLoadCosts:
        """The timing model's read cost per block of each tier below the host (a load's fixed
        latency left out) against recomputing a block at ``prefill_ms_per_token``."""
        cfg = self.config
        per_block = cfg.kv_bytes_per_block / 1e6  # MB; GB/s = MB/ms
        host_ms = per_block / cfg.host_kv_gbps
        read_ms = {
            DISK: per_block / cfg.disk_kv_gbps + host_ms,
            SHARED: per_block / cfg.shared_kv_gbps + host_ms,
        }
        return ModelLoadCosts(read_ms, cfg.prefill_ms_per_token * self.block_size)

    def _load_ms(self, plan: LoadPlan, loaded: int) -> float:
        """Simulated milliseconds to bring ``loaded`` planned blocks to the device."""
        cfg = self.config
        per_block = cfg.kv_bytes_per_block / 1e6  # MB; GB/s = MB/ms
        mediums = (plan.mediums + [SHARED] * loaded)[:loaded]
        ms = 0.0
        for medium, gbps, latency in (
            (HOST, cfg.host_kv_gbps, cfg.host_kv_latency_ms),
            (DISK, cfg.disk_kv_gbps, cfg.disk_kv_latency_ms),
            (SHARED, cfg.shared_kv_gbps, cfg.shared_kv_latency_ms),
        ):
            n = mediums.count(medium)
            if n:
                ms += latency + n * per_block / gbps
                if medium != HOST:  # read from storage into host memory, then copied up
                    ms += n * per_block / cfg.host_kv_gbps
        return ms

    async def shutdown(self) -> None:
        """Stop the scheduler; requests still in flight end with an `EngineError`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.scheduler.fail_all(EngineError("mocker engine shut down"))
        onboarder = self.scheduler.onboarder
        if isinstance(onboarder, TierOnboarder):
            await onboarder.close()
        if self.tiers is not None:  # the last blocks go down, and their writes finish
            _step_boundary(self.tiers, idle=True)
            await asyncio.to_thread(self.tiers.close)
            self.tiers = None

    # -- KV events and metrics ----------------------------------------------------------------

    def kv_block_size(self) -> int:
        return self.block_size

    def kv_snapshot(self) -> list[KvEvent] | None:
        if self.block_manager is None:
            return None
        return snapshot_events(self.block_manager, self.tiers)

    def kv_events(self) -> KvEventFanout:
        """Its block manager's KV events (a worker publishes them for the router)."""
        return self._kv_events

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading tokens cached here: on the device, then in the local tiers below."""
        return cached_prefix_tokens(self.block_manager, self.tiers, token_ids)

    async def stored_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading tokens cached here or loadable from shared storage."""
        return await stored_prefix_tokens(self.block_manager, self.tiers, token_ids)

    def reset_prefix_cache(self) -> None:
        """Drop every cached block no request uses (emits `AllBlocksCleared`/`BlockRemoved`)."""
        self.block_manager.clear_cache()

    def stats(self) -> EngineStats:
        stats = self.scheduler.stats(self._prompt_tokens)
        if self.tiers is not None:
            stats.kv_tiers = self.tiers.snapshot()
        return stats

    def load_metrics(self, worker_id: int) -> LoadMetrics:
        """The snapshot a worker publishes for the KV-aware router."""
        return self.scheduler.load_metrics(worker_id)

    @property
    def num_preemptions(self) -> int:
        """Sequences preempted for lack of KV blocks (each one is recomputed later)."""
        return self.scheduler.num_preemptions

    @property
    def simulated_time_ms(self) -> float:
        """Simulated GPU time of all steps so far (idle time does not count)."""
        return self._clock_ms

    def simulated_ttft_ms(self, request_id: str) -> float | None:
        """Simulated time from arrival to first token of a recent request (None if unknown)."""
        return self._ttft.get(request_id)

    # -- requests -----------------------------------------------------------------------------

    def generate(
        self, request: PreprocessedRequest, options: GenerateOptions = NO_OPTIONS
    ) -> AsyncIterator[EngineOutput]:
        """Queue the request and stream its deltas; closing the stream aborts it at once.

        The scheduler's own stream, not a generator around it (one layer less on every token);
        so a bad request raises here, at the call. Outputs the consumer has not picked up yet
        are merged into one delta, so a slow consumer gets fewer, larger messages.
        """
        if self._task is None:
            raise EngineError("MockerEngine.generate() called before start()")
        if self._failure is not None:
            raise self._failure
        prompt = list(request.token_ids)
        # logprobs up to the vocabulary it draws from (each alternative is a loop turn: a
        # million would stall the event loop every step); prompt ids it never indexes (the
        # worker holds them to `vocab_size`, the served model's)
        limits = RequestLimits(self.context_length, max_logprobs=self.vocab_size)
        check_request(request, limits)
        self._prompt_tokens += len(prompt)
        if request.stop.max_tokens <= 0:
            return _nothing_to_generate()
        return stream_outputs(self._submit(request, prompt), self.scheduler.abort)

    def _submit(self, request: PreprocessedRequest, prompt: list[int]) -> _Seq:
        self._next_id += 1
        digest = hashlib.blake2b(array("q", prompt).tobytes(), digest_size=8).digest()
        seq = _Seq(
            seq_id=f"{request.request_id}#{self._next_id}",
            request=request,
            prompt_len=len(prompt),
            tokens=prompt,
            stop_ids=frozenset(request.stop.stop_token_ids),
            key=int.from_bytes(digest, "little") ^ _mix64(self.seed & _U64),
            arrival_ms=self._now_ms(),
        )
        self.scheduler.add(seq)
        self._wakeup.set()
        return seq

    def _now_ms(self) -> float:
        """The simulated time now, interpolated inside the step in flight."""
        if self._step_started is None:
            return self._clock_ms
        elapsed = (asyncio.get_running_loop().time() - self._step_started) * 1000 * self.speedup
        return self._clock_ms + min(elapsed, self._step_ms)

    # -- the scheduler ------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Schedule, sleep for the step's simulated time, then apply its results; forever."""
        loop = asyncio.get_running_loop()
        try:
            tiers = self.tiers
            while True:
                if not self.scheduler.has_work:
                    if tiers is not None:  # the last step's blocks go down now
                        _step_boundary(tiers, idle=True)
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                work = self.scheduler.schedule()
                if not work:  # every request waits for KV being loaded
                    if tiers is not None:  # blocks the loads evicted go down first
                        _step_boundary(tiers)
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if tiers is not None:
                    _step_boundary(tiers)
                self._step_ms = self._step_time_ms(work)
                self._step_started = loop.time()
                await asyncio.sleep(self._step_ms / 1000 / self.speedup)
                self._step_started = None
                self._clock_ms += self._step_ms
                self.num_steps += 1
                self._complete(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("mocker scheduler failed")
            self._failure = EngineError(f"mocker scheduler failed: {type(exc).__name__}: {exc}")
            self.scheduler.fail_all(self._failure)

    def _step_time_ms(self, work: list[ScheduledChunk]) -> float:
        """Simulated duration of one forward pass over `work` (see the module docstring)."""
        ms = self.decode_ms_base
        for seq, n in work:
            if seq.prefilling:
                ctx = seq.num_computed + n
                ms += n * self.prefill_ms_per_token + self.prefill_ms_quadratic * n * ctx
            else:
                ms += self.decode_ms_per_seq + self.decode_ms_per_ctx_token * len(seq.tokens)
        return ms

    def _complete(self, work: list[ScheduledChunk]) -> None:
        """Apply a finished step: advance prefills, then one made-up token per finished chunk."""
        for chunk in work:
            if chunk.seq.prefilling and chunk.seq.state is SeqState.RUNNING:
                self.computed_prompt_tokens += chunk.num_tokens
        for seq in self.scheduler.complete(work):
            assert isinstance(seq, _Seq)
            try:
                token, logprob = self._token_at(seq, seq.num_generated)
                k = seq.request.output.logprobs
                top = self._top_logprobs(token, logprob, k) if k is not None else None
                lp = logprob if k is not None else None
                out = self.scheduler.append_token(seq, token, lp, top)
            except Exception as exc:  # this request's, not the step's: the others go on
                log.exception("mocker: request %s failed", seq.request.request_id)
                self.scheduler.fail(seq, EngineError(
                    f"request {seq.request.request_id}: {type(exc).__name__}: {exc}"
                ))  # fmt: skip
                continue
            if out is not None and out.cached_tokens is not None:
                self._record_ttft(seq)

    def _record_ttft(self, seq: _Seq) -> None:
        self._ttft[seq.request.request_id] = self._clock_ms - seq.arrival_ms
        while len(self._ttft) > _TTFT_HISTORY:
            self._ttft.popitem(last=False)

    def _token_at(self, seq: _Seq, position: int) -> tuple[int, float]:
        """The deterministic token at `position` and a plausible logprob for it."""
        h = _mix64(seq.key ^ _mix64(position))
        return h % self.vocab_size, -((h >> 40) % 1000) / 1000.0

    def _top_logprobs(self, token: int, logprob: float, k: int) -> list[TokenLogprob]:
        """The sampled token first, then up to `k` distinct made-up, less likely alternatives."""
        top = [TokenLogprob(token, logprob)]
        seen = {token}
        for i in range(1, k + 1):
            alt = (token + i * 7919) % self.vocab_size
            if alt not in seen:
                seen.add(alt)
                top.append(TokenLogprob(alt, logprob - i))
        return top


def _step_boundary(tiers: TierStack, *, idle: bool = False) -> None:
    """A step boundary for the tiers: the mocker's blocks have no bytes to copy."""
    tiers.begin_step(idle=idle)
    tiers.end_step()


async def _nothing_to_generate() -> AsyncIterator[EngineOutput]:
    """The stream of a request for no tokens: one empty, finished delta."""
    yield EngineOutput(token_ids=[], finish_reason="length", cached_tokens=0)
