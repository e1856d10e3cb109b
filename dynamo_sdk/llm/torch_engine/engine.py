"""`out=torch`: the project's own engine, on PyTorch alone.

The pieces, each in its own module:

* ``Scheduler`` (shared with the mocker): continuous batching with a per-step token budget,
  chunked prefill mixed with decode, preemption by recompute, abort on cancel.
* ``BlockManager`` (shared with the mocker and the router's view of it): paged KV blocks,
  vLLM-compatible block hashes, prefix reuse, LRU eviction, KV events and usage.
* ``ModelRunner``: the step's inputs, the paged KV cache tensor, CUDA graphs for decode.
* ``LlamaModel``: Llama/Mistral/Qwen2 weights and forward pass (SDPA on CPU, Triton on CUDA).
* ``sampler``: per-request sampling, penalties, seeds and logprobs.

The asyncio loop owns all request state; each step's forward pass runs in one worker thread,
so the event loop (NATS heartbeats, new requests, cancellations) stays responsive while the
device computes. A request cancelled mid-step is dropped when the step returns; its blocks
are freed at once (the running step may still write their KV, which is harmless: nothing is
allocated until the next step is scheduled, on this same loop).

Its knobs (a worker's YAML section or ``dynamo run`` flags) are `TorchConfig`'s
(``dynamo_sdk/llm/engines/configs.py``: device, dtype, KV cache size, batch limits, CUDA graphs).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

from dynamo_sdk.llm.engines.base import (
    NO_OPTIONS,
    Engine,
    EngineConfigError,
    EngineError,
    EngineStats,
    GenerateOptions,
    PrefillSlots,
    RequestLimits,
    check_request,
)
from dynamo_sdk.llm.engines.configs import TorchConfig, settings
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
from dynamo_sdk.llm.kv.block_manager import BlockManager, NoFreeBlocksError
from dynamo_sdk.llm.kv.events import KvEvent, KvEventCallback, KvEventFanout, LoadMetrics
from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.kv.resync import snapshot_events
from dynamo_sdk.llm.kv.tiers.costs import MeasuredLoadCosts
from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity
from dynamo_sdk.llm.kv.tiers.stack import TierStack
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_sdk.llm.torch_engine.config import ModelConfig
from dynamo_sdk.llm.torch_engine.host_kv import HostKvPool
from dynamo_sdk.llm.torch_engine.loader import load_model, resolve_dtype
from dynamo_sdk.llm.torch_engine.runner import (
    DEFAULT_CUDA_GRAPH_SIZES,
    ChunkInput,
    ModelRunner,
    StepHandle,
)
from dynamo_sdk.llm.torch_engine.sampler import Sampled, SampleRow, SamplingParams

log = logging.getLogger(__name__)

_MAX_FAILED_STEPS = 3  # forward passes failing in a row before the engine gives up for good


@dataclass
class _Step:
    """A launched step and what it computes."""

    work: list[ScheduledChunk]
    chunks: list[ChunkInput]
    handle: StepHandle
    chained: bool = False  # planned before the previous step's tokens were known
    prefill_tokens: int = 0  # prompt tokens it computes
    launched: float = 0.0  # perf_counter() at launch


@dataclass(eq=False)
class _Seq(Sequence):
    params: SamplingParams | None = None
    plain_row: SampleRow | None = None  # reused every step when nothing in it changes


class TorchEngine(Engine):
    """Paged-KV, continuously batching engine for Llama-family models (see module docstring).

    Its knobs are `TorchConfig`'s, given as the config object or as keyword arguments; it is
    its own `kv_port()` (block export / import / writes for disaggregation and offload).
    """

    def __init__(
        self,
        model: str | None,
        config: TorchConfig | None = None,
        *,
        model_config: ModelConfig | None = None,
        on_events: KvEventCallback | None = None,
        **knobs: Any,
    ) -> None:
        config = config or settings(TorchConfig, knobs)
        self.settings = config
        if model is None and model_config is None:
            raise EngineConfigError("the torch engine needs a model folder (or load_format dummy)")
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError(
                "torch engine: device cuda asked for, but CUDA is not available"
            )
        self.model_path = model
        self.config = model_config or ModelConfig.from_folder(model)  # type: ignore[arg-type]
        self.vocab_size = self.config.vocab_size
        config_json = Path(model) / "config.json" if model else None
        try:
            self.dtype = resolve_dtype(config.dtype, self.device, config_json)
        except ValueError as exc:
            raise EngineConfigError(f"torch engine: {exc}") from exc
        self.load_format = config.load_format
        self.block_size = config.block_size
        self._num_blocks_wanted = config.num_blocks
        self.gpu_memory_utilization = config.gpu_memory_utilization
        self.kv_cache_gb = config.kv_cache_gb
        if config.max_model_len > self.config.max_position_embeddings:
            # Positions past the model's rotary table would index out of it mid-step.
            raise EngineConfigError(
                f"torch engine: max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.config.max_position_embeddings}"
            )
        self._max_model_len_wanted = config.max_model_len or self.config.max_position_embeddings
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_prefix_caching = config.enable_prefix_caching
        graph_sizes = config.cuda_graph_sizes or [
            s for s in DEFAULT_CUDA_GRAPH_SIZES if s <= config.max_num_seqs
        ]
        eager = config.enforce_eager or self.device.type != "cuda"
        self.cuda_graph_sizes: tuple[int, ...] = () if eager else tuple(graph_sizes)
        self.seed = config.seed
        self.context_length = self._max_model_len_wanted
        self._kv_events = KvEventFanout("torch engine")
        self._kv_events.subscribe(on_events)
        self.runner: ModelRunner | None = None
        self.tiers: TierStack | None = None
        self.block_manager: BlockManager | None = None
        self._scheduler: Scheduler | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="torch-engine")
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._failure: EngineError | None = None
        self._failed_steps = 0  # consecutive steps whose forward pass raised
        self.num_failed_steps = 0
        """Steps whose forward pass raised (their requests failed; the engine went on)."""
        self._next_id = 0
        self._prompt_tokens = 0
        self.num_steps = 0
        self.computed_prompt_tokens = 0
        """Prompt (and re-prefill) tokens run through the model: prefix-cache hits excluded."""
        self.num_chained_steps = 0
        """Decode steps launched ahead, before the previous step's tokens were known."""
        self.launch_ahead_on_cpu = False
        self._load_costs: MeasuredLoadCosts | None = None  # the tiers' read-or-recompute costs
        """Pipeline decode steps on CPU too (no gain there; lets CPU tests cover the path)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the weights, size and allocate the KV cache, capture graphs, start stepping."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        await loop.run_in_executor(self._executor, self._load)
        assert self.runner is not None
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            on_events=self._kv_events.publish,
        )
        self._scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            context_length=self.context_length,
        )
        self._start_tiers(loop)
        self._failure = None
        # The block manager's per-block records and the model's tensors live for the whole
        # process; moving them out of the cyclic GC's reach keeps collections (triggered by
        # the per-step allocations) from rescanning them, which cost ~30% of the host time
        # of a 128-sequence decode step. vLLM does the same after start-up.
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._loop(), name="torch-engine-steps")
        log.info(
            "torch engine ready in %.1f s: %s on %s (%s), %d KV blocks of %d tokens, context %d",
            time.monotonic() - began,
            self.config.architecture,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.runner.num_blocks,
            self.block_size,
            self.context_length,
        )

    def _start_tiers(self, loop: asyncio.AbstractEventLoop) -> None:
        """The KV tiers below the device cache, if the settings ask for them."""
        runner, bm, sched = self.runner, self.block_manager, self._scheduler
        assert runner is not None and bm is not None and sched is not None
        plan = tier_plan(self.settings, runner.kv_block_bytes(), runner.num_blocks)
        if not plan.enabled:
            return
        cfg = self.config
        model = Path(self.model_path).name if self.model_path else cfg.architecture
        if self.load_format == "dummy":
            model = f"{model}:dummy-seed{self.seed}"  # random weights: their KV is their own
        identity = LayoutIdentity(
            model=model,
            dtype=str(self.dtype).removeprefix("torch."),
            block_size=self.block_size,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
        )

        async def on_engine(fn: Callable[[], None]) -> None:
            await loop.run_in_executor(self._executor, fn)

        pool = HostKvPool(runner.kv, plan.host_blocks)
        self._load_costs = MeasuredLoadCosts(self.block_size)  # prefill times from the steps
        stack = TierStack(
            plan, identity, pool, self._kv_events.publish, on_engine, costs=self._load_costs
        )
        stack.bind_loop(loop)
        self.tiers = stack
        bm.tiers = stack
        sched.onboarder = TierOnboarder(stack, sched, self._wakeup.set)
        stack.announce()

    def _load(self) -> None:
        """(worker thread) weights, cache size, runner, graphs."""
        try:
            model = load_model(
                self.model_path,
                device=self.device,
                dtype=self.dtype,
                load_format=self.load_format,
                config=self.config,
                seed=self.seed,
            )
        except (OSError, ValueError) as exc:
            raise EngineError(f"torch engine: cannot load {self.model_path}: {exc}") from exc
        num_blocks = self._num_blocks_wanted or self._auto_num_blocks()
        max_len = min(self._max_model_len_wanted, num_blocks * self.block_size)
        if max_len <= 1:
            raise EngineError(f"torch engine: {num_blocks} KV blocks hold no useful context")
        self.context_length = max_len
        self.runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=self.block_size,
            max_model_len=max_len,
            cuda_graph_sizes=self.cuda_graph_sizes,
        )
        self.runner.capture_cuda_graphs()

    def _auto_num_blocks(self) -> int:
        cfg = self.config
        per_block = (
            2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim
        ) * torch.tensor([], dtype=self.dtype).element_size()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # what the budget allows beyond what is already in use, less room for activations
            # (a full prefill step's MLP intermediate and logits) and CUDA graphs
            activations = self.max_num_batched_tokens * (
                4 * cfg.intermediate_size + 6 * cfg.hidden_size
            ) * 2 + (1 << 30)
            budget = free - total * (1 - self.gpu_memory_utilization) - activations
        else:
            budget = self.kv_cache_gb * (1 << 30)
        blocks = int(budget // per_block)
        if blocks < 1:
            raise EngineError(
                "torch engine: no memory left for the KV cache "
                f"(budget {budget / (1 << 30):.2f} GiB); lower max_num_batched_tokens or raise "
                "gpu_memory_utilization / kv_cache_gb"
            )
        return blocks

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._scheduler is not None:
            self._scheduler.fail_all(EngineError("torch engine shut down"))
            onboarder = self._scheduler.onboarder
            if isinstance(onboarder, TierOnboarder):
                await onboarder.close()
        if self.tiers is not None:  # the last blocks go down, and their writes finish
            await self._copy_out(self.tiers, idle=True)
            await asyncio.to_thread(self.tiers.close)
            self.tiers = None
        self._executor.shutdown(wait=True)
        gc.unfreeze()
        if self.runner is not None:
            self.runner.close()
            self.runner = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- KV events, metrics, KV import/export --------------------------------------------------

    def kv_block_size(self) -> int:
        return self.block_size

    def kv_snapshot(self) -> list[KvEvent] | None:
        if self.block_manager is None:
            return None
        return snapshot_events(self.block_manager, self.tiers)

    def kv_events(self) -> KvEventFanout:
        return self._kv_events

    def kv_port(self) -> TorchEngine:
        """The engine itself: it implements every `KvPort` operation."""
        return self

    def stats(self) -> EngineStats:
        if self._scheduler is None:
            return EngineStats()
        stats = self._scheduler.stats(self._prompt_tokens)
        if self.tiers is not None:
            stats.kv_tiers = self.tiers.snapshot()
        return stats

    def load_metrics(self, worker_id: int) -> LoadMetrics:
        if self._scheduler is None:
            return LoadMetrics(worker_id, 0.0, 0, 0, 0, 0)
        return self._scheduler.load_metrics(worker_id)

    @property
    def num_preemptions(self) -> int:
        return self._scheduler.num_preemptions if self._scheduler else 0

    def reset_prefix_cache(self) -> None:
        if self.block_manager is not None:
            self.block_manager.clear_cache()

    def export_prefix(self, token_ids: list[int]) -> tuple[int, torch.Tensor]:
        """The cached KV of the longest full-block prefix of ``token_ids``.

        Returns (tokens covered, buffer ``[layers, 2, blocks, block_size, kv_heads, head_dim]``
        on this engine's device). The basis of prefill-to-decode transfer and of offload.
        """
        bm, runner = self._ready()
        block_ids = bm.cached_prefix(token_ids)
        return len(block_ids) * self.block_size, runner.export_blocks(block_ids)

    def import_prefix(self, token_ids: list[int], kv: torch.Tensor) -> int:
        """Put exported KV for ``token_ids``' first ``kv.shape[2]`` blocks in the prefix cache.

        Blocks already cached here are kept (and not rewritten); the others are written from
        ``kv``, registered (``BlockStored``) and then behave like any cached prefix: the next
        request with this prefix computes only what follows. Returns the tokens now cached.
        """
        bm, runner = self._ready()
        num_tokens = kv.shape[2] * self.block_size
        if num_tokens > len(token_ids):
            raise EngineError(f"KV for {num_tokens} tokens but only {len(token_ids)} token ids")
        prefix = list(token_ids[:num_tokens])
        holder = f"import#{self._new_id()}"
        try:
            alloc = bm.allocate(holder, prefix, num_computed=0)
        except NoFreeBlocksError as exc:
            raise EngineError(f"no room to import {num_tokens} tokens of KV: {exc}") from exc
        if self.tiers is not None:
            self.tiers.forget_pending(alloc.block_ids)  # overwritten right here
        try:
            first = alloc.num_cached_tokens // self.block_size
            if first < len(alloc.block_ids):
                try:
                    runner.import_blocks(alloc.block_ids[first:], kv[:, :, first:])
                except ValueError as exc:
                    raise EngineError(f"cannot import KV: {exc}") from exc
            bm.mark_computed(holder, num_tokens)
        finally:
            bm.free(holder)
        return num_tokens

    def _ready(self) -> tuple[BlockManager, ModelRunner]:
        if self.block_manager is None or self.runner is None:
            raise EngineError("torch engine not started")
        return self.block_manager, self.runner

    # -- requests ------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def generate(
        self, request: PreprocessedRequest, options: GenerateOptions = NO_OPTIONS
    ) -> AsyncIterator[EngineOutput]:
        """Queue the request and stream its deltas; closing the stream aborts it at once.

        With ``options.remote_prefill`` the prompt's blocks are allocated first and handed to
        it to be filled elsewhere (a prefill worker); the request then computes only what was
        not written (at least its last prompt token, whose logits give the first token). If no
        blocks are free, or the prefill fails, the prompt is computed here.
        """
        remote_prefill = options.remote_prefill
        sched = self._accepting("generate")
        seq = self._new_seq(request)
        if request.stop.max_tokens <= 0:
            yield EngineOutput(token_ids=[], finish_reason="length", cached_tokens=0)
            return
        blocks = sched.start_remote(seq) if remote_prefill is not None else None
        if blocks is not None and self.tiers is not None:
            self.tiers.forget_pending(blocks)  # written by the prefill worker before a step
        if remote_prefill is not None and blocks is not None:
            slots = PrefillSlots(blocks, seq.num_computed, self.block_size)
            try:
                written = await remote_prefill(slots)
            except asyncio.CancelledError:
                sched.abort(seq)
                raise
            except Exception:
                log.exception("remote prefill of %s failed; prefilling locally", seq.seq_id)
                written = 0
            sched.finish_remote(seq, written)
        else:
            sched.add(seq)
        self._wakeup.set()
        async with contextlib.aclosing(stream_outputs(seq, sched.abort)) as outputs:
            async for out in outputs:
                yield out

    def healthy(self) -> bool:
        return self._failure is None

    def _accepting(self, method: str) -> Scheduler:
        """The scheduler, if the engine takes requests now; else why not, as an error."""
        if self._task is None or self._scheduler is None:
            raise EngineError(f"TorchEngine.{method}() called before start()")
        if self._failure is not None:
            raise self._failure
        return self._scheduler

    def _new_seq(self, request: PreprocessedRequest) -> _Seq:
        """A checked request as a sequence for the scheduler: ids inside the embedding table,
        options in range (`check_request`), so nothing in it can break a step for others."""
        check_request(request, RequestLimits(self.context_length, self.vocab_size))
        self._prompt_tokens += len(request.token_ids)
        return _Seq(
            seq_id=f"{request.request_id}#{self._new_id()}",
            request=request,
            prompt_len=len(request.token_ids),
            tokens=list(request.token_ids),
            stop_ids=frozenset(request.stop.stop_token_ids),
            params=SamplingParams.from_request(request, self.device),
        )

    async def prefill_and_export(
        self, request: PreprocessedRequest, first_block: int = 0
    ) -> tuple[int, torch.Tensor]:
        """Compute a prompt's KV here (a prefill worker's job) and read it out.

        Returns (tokens covered, KV of blocks ``first_block`` .. ceil(covered / block_size)),
        covering every prompt token but the last, its partly filled last block included: the
        decode side computes only that last token (its logits give the first output token), as
        in vLLM's disaggregation, so the step that adds the request to a decode batch stays a
        one-token-per-sequence decode step (a CUDA graph) instead of an eager prefill step that
        stalls every running stream. The blocks are read when the sequence finishes, before
        they are freed: a partly filled block is not prefix-cached and would be lost after.
        """
        sched, (_, runner) = self._accepting("prefill_and_export"), self._ready()
        one = msgspec.structs.replace(
            request, stop=msgspec.structs.replace(request.stop, max_tokens=1, min_tokens=0)
        )
        seq = self._new_seq(one)
        covered = len(request.token_ids) - 1
        last_block = -(-covered // self.block_size)
        exported: list[torch.Tensor] = []
        seq.on_finish = lambda table: exported.append(
            runner.export_blocks(table[first_block:last_block])
        )
        sched.add(seq)
        self._wakeup.set()
        async with contextlib.aclosing(stream_outputs(seq, sched.abort)) as outputs:
            async for _ in outputs:
                pass
        if not exported:
            raise EngineError(f"prefill of {request.request_id} ended without its KV")
        return covered, exported[0]

    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Write transferred KV (``export_blocks`` layout) into this engine's ``block_ids``."""
        _, runner = self._ready()
        try:
            runner.import_blocks(block_ids, kv)
        except ValueError as exc:
            raise EngineError(f"cannot write transferred KV: {exc}") from exc

    def kv_cache_tensor(self) -> torch.Tensor:
        """The whole paged KV cache, ``[layers, 2, blocks + 1, block_size, kv_heads, head_dim]``
        (block ids index dimension 2): what a GPU-to-GPU transfer writes into."""
        return self._ready()[1].kv

    def kv_layout(self) -> KvLayout:
        """What a KV buffer of this engine looks like, for peers to check before sending."""
        cfg = self.config
        return KvLayout(
            num_layers=cfg.num_layers,
            block_size=self.block_size,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading prompt tokens whose KV is here: on the device, then in the host and disk
        tiers (for the disaggregation rule: a stored prompt is loaded, not prefilled remotely)."""
        return cached_prefix_tokens(self.block_manager, self.tiers, token_ids)

    async def stored_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading tokens cached here or loadable from shared storage."""
        return await stored_prefix_tokens(self.block_manager, self.tiers, token_ids)

    # -- the step loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Schedule, launch, collect, stream; with decode steps launched one step ahead.

        While a decode step runs on the device, the next one is already planned and queued
        (``Scheduler.reserve_next``; its input ids are the running step's sampled tokens,
        read on the device), so the host work of streaming one step's tokens overlaps the
        device work of the next instead of leaving the GPU idle between steps. A sequence that
        turns out to have finished computes one extra token, which is dropped. Steps that
        admit or prefill requests, or need host-side sampling (logprobs, penalties), run one
        at a time.

        A failure is confined to the requests it concerns: a row that cannot be sampled fails
        its request (the sampler samples the others, `runner.launch`), a sequence whose token
        cannot be applied fails alone, and a forward pass that raises fails the requests of
        its step (any of them may be the cause; `_step_failed`) while the engine serves the
        rest. Only ``_MAX_FAILED_STEPS`` failed steps in a row (a broken device), or a fault
        in the scheduling itself, fail the engine for good.
        """
        loop = asyncio.get_running_loop()
        sched, runner = self._scheduler, self.runner
        assert sched is not None and runner is not None
        inflight: _Step | None = None
        tiers = self.tiers
        try:
            while True:
                if inflight is None:
                    if not sched.has_work:
                        self._wakeup.clear()  # before any await: a request arriving during
                        if tiers is not None:  # the copy below is not missed
                            await self._copy_out(tiers, idle=True)  # the last blocks go down
                        if not sched.has_work:
                            await self._wakeup.wait()
                        continue
                    work = sched.schedule()
                    if not work:  # every request waits for KV being loaded
                        self._wakeup.clear()
                        if tiers is not None:  # blocks the loads evicted go out first,
                            await self._copy_out(tiers)  # before a load overwrites them
                        await self._wakeup.wait()
                        continue
                    try:
                        chunks = [self._chunk_input(c) for c in work]
                        prefill = sum(c.num_tokens for c in work if c.seq.prefilling)
                        self.computed_prompt_tokens += prefill
                        if tiers is not None:
                            await self._copy_out(tiers)
                        launched = time.perf_counter()
                        handle = await loop.run_in_executor(self._executor, runner.launch, chunks)
                    except Exception as exc:
                        self._step_failed([work], exc)
                        continue
                    inflight = _Step(work, chunks, handle, False, prefill, launched)
                nxt: _Step | None = None
                try:
                    ahead = self._launch_ahead(inflight)
                    if ahead is not None:
                        ahead_work, ahead_chunks = ahead
                        nxt = _Step(ahead_work, ahead_chunks, StepHandle(), chained=True)
                        if tiers is not None:
                            await self._copy_out(tiers)
                        nxt.handle = await loop.run_in_executor(
                            self._executor, runner.launch, ahead_chunks, inflight.handle.tokens
                        )
                    sampled = await loop.run_in_executor(
                        self._executor, runner.collect, inflight.handle
                    )
                except Exception as exc:  # the chained step is planned on these sequences
                    self._step_failed([inflight.work, nxt.work if nxt else []], exc)
                    inflight = None
                    continue
                self.num_steps += 1
                self._failed_steps = 0
                if inflight.prefill_tokens and self._load_costs is not None:
                    self._load_costs.observe_prefill(
                        inflight.prefill_tokens, time.perf_counter() - inflight.launched
                    )
                self._apply(inflight, sampled)
                if nxt is not None:  # its tokens' ids are known now: register their blocks
                    self.num_chained_steps += 1
                    bm = sched.block_manager
                    for c in nxt.work:
                        if c.seq.state is SeqState.RUNNING:
                            bm.mark_computed(c.seq.seq_id, len(c.seq.tokens))
                inflight = nxt
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("torch engine step failed")
            self._failure = EngineError(f"torch engine failed: {type(exc).__name__}: {exc}")
            sched.fail_all(self._failure)

    def _step_failed(self, steps: list[list[ScheduledChunk]], exc: Exception) -> None:
        """A step's forward pass (or its launch) raised: fail the requests it carried.

        Which row caused it is unknown, so every request of the step fails, and so does any
        other holding one of their blocks (a prefix shared with a request admitted while the
        step ran): the blocks the step registered as computed were never written. Their
        pending tier copies are dropped and the device prefix cache cleared of unused blocks,
        so no later request reads that KV. Raises (failing the engine for good) after
        ``_MAX_FAILED_STEPS`` failed steps in a row: then the device, not a request, is broken.
        """
        sched, bm = self._scheduler, self.block_manager
        assert sched is not None and bm is not None
        self._failed_steps += 1
        self.num_failed_steps += 1
        if self._failed_steps >= _MAX_FAILED_STEPS:
            raise exc
        log.error("torch engine step failed (%d in a row): %s: %s; failing its requests",
                  self._failed_steps, type(exc).__name__, exc, exc_info=exc)  # fmt: skip
        error = EngineError(f"torch engine step failed: {type(exc).__name__}: {exc}")
        failed = {id(c.seq): c.seq for work in steps for c in work}
        blocks: set[int] = set()
        for seq in failed.values():
            if seq.state in (SeqState.RUNNING, SeqState.REMOTE):
                blocks.update(bm.block_table(seq.seq_id))
        for seq in [*sched.running, *sched.remote]:
            if id(seq) not in failed and not blocks.isdisjoint(bm.block_table(seq.seq_id)):
                failed[id(seq)] = seq
        if self.tiers is not None:
            self.tiers.forget_pending(sorted(blocks))
        for seq in failed.values():
            sched.fail(seq, error)
        bm.clear_cache()

    async def _copy_out(self, tiers: TierStack, *, idle: bool = False) -> None:
        """Copy the blocks due out of the device, in order with the steps (see `TierStack`)."""
        due = tiers.begin_step(idle=idle)
        if due is not None:
            blocks, slots = due
            io = tiers.io
            await asyncio.get_running_loop().run_in_executor(
                self._executor, io.device_to_host, blocks, slots
            )
        tiers.end_step()

    def _launch_ahead(self, step: _Step) -> tuple[list[ScheduledChunk], list[ChunkInput]] | None:
        """The next decode step, planned while ``step`` runs, or None if it must wait."""
        sched = self._scheduler
        assert sched is not None and self.block_manager is not None
        if (
            self.device.type != "cuda" and not self.launch_ahead_on_cpu
        ) or step.handle.tokens is None:
            return None  # no device-side tokens to feed forward (host sampling was needed)
        if sched.waiting or len(step.work) != len(sched.running):
            return None  # admissions first: they go through a normal schedule
        if any(c.num_tokens != 1 for c in step.work):
            return None
        seqs = [c.seq for c in step.work]
        work = sched.reserve_next(seqs)
        if work is None:
            return None
        bm = self.block_manager
        chunks = [
            ChunkInput(
                token_ids=[0],  # fed on the device from the running step
                start=len(seq.tokens),
                block_table=bm.block_table(seq.seq_id),
                sample=self._sample_row(seq),  # type: ignore[arg-type]
            )
            for seq in seqs
        ]
        return work, chunks

    def _apply(self, step: _Step, sampled: list[Sampled]) -> None:
        """Stream a finished step's tokens (and finish, grow or preempt its sequences); a
        row the sampler could not sample, or whose token cannot be applied, fails its own
        request only."""
        sched = self._scheduler
        assert sched is not None
        ready = {id(s) for s in sched.complete(step.work)}
        results = iter(sampled)
        for chunk, inputs in zip(step.work, step.chunks, strict=True):
            if inputs.sample is None:
                continue
            result = next(results)
            seq = chunk.seq
            if id(seq) not in ready:  # aborted, preempted or finished meanwhile
                continue
            if result.error is not None:
                log.warning("request %s: sampling failed: %s", seq.request.request_id,
                            result.error)  # fmt: skip
                sched.fail(seq, EngineError(
                    f"request {seq.request.request_id}: sampling failed: {result.error}"
                ))  # fmt: skip
                continue
            try:
                sched.append_token(seq, result.token, result.logprob, result.top)
            except Exception as exc:
                log.exception("request %s: applying its token failed", seq.request.request_id)
                sched.fail(seq, EngineError(
                    f"request {seq.request.request_id}: {type(exc).__name__}: {exc}"
                ))  # fmt: skip

    def _chunk_input(self, chunk: ScheduledChunk) -> ChunkInput:
        seq = chunk.seq
        assert isinstance(seq, _Seq) and seq.params is not None and self.block_manager
        start = chunk.start
        return ChunkInput(
            token_ids=seq.tokens[start : start + chunk.num_tokens],
            start=start,
            block_table=self.block_manager.block_table(seq.seq_id),
            sample=self._sample_row(seq) if chunk.samples else None,
        )

    @staticmethod
    def _sample_row(seq: _Seq) -> SampleRow:
        """What the sampler needs for ``seq`` now (one shared row unless it changes per step)."""
        params = seq.params
        assert params is not None
        banned = seq.num_generated < seq.request.stop.min_tokens
        if not params.has_penalties and not banned:
            if seq.plain_row is None:
                seq.plain_row = SampleRow(params)
            return seq.plain_row
        return SampleRow(
            params,
            prompt=seq.tokens[: seq.prompt_len] if params.repetition_penalty != 1.0 else [],
            output=seq.output_tokens if params.has_penalties else [],
            banned=sorted(seq.stop_ids) if banned else [],
        )
