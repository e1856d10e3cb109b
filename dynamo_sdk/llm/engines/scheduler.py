"""Continuous batching over a paged KV cache: one scheduler for the mocker and the torch engine.

The mocker fakes the forward pass and the torch engine runs a real one, but what happens
around it is the same and lives here, once (vLLM v1's policy):

* Each step first serves the running sequences (one token per decoding sequence, the next chunk
  for a partially prefilled one), then admits waiting requests first-come first-served while
  ``max_num_seqs``, the per-step token budget ``max_num_batched_tokens`` and free KV blocks
  allow. A prompt's cached prefix is not recomputed; a prompt larger than the remaining budget
  is prefilled in chunks over several steps (chunked prefill).
* The chunk scheduled for a sequence is marked computed in the block manager at schedule time:
  its KV is written during this step, before any later step (or a later layer of this one) can
  read it, so its full blocks may join the prefix cache now.
* Preemption by recomputation: when a decoding sequence needs a new block and none is free, the
  newest running sequence is preempted (blocks freed, back to the front of the queue). Tokens it
  already streamed stay streamed; once re-admitted it re-prefills prompt + generated tokens
  (often mostly from its own cached blocks) and carries on.
* One request's failure is its own: `fail` ends one sequence with an error and leaves the
  others as they are (an engine whose step went wrong for one row fails that request, not
  the batch), and a request that can never be admitted (more tokens than the whole cache
  holds) fails alone instead of stalling the queue behind it.
* Stop rules: a generated id in ``stop_token_ids`` stops the request once ``min_tokens`` were
  generated; ``max_tokens`` or the context length end it with ``length``.
* Onboarding (with an ``onboarder``, the tier stack's side): a request whose prompt continues
  past its device-cache hit in host memory, on disk or in shared storage gets its blocks at
  admission and waits, off the running batch, while the onboarder copies that KV in; then it
  joins the batch to compute only the rest. Other requests keep running meanwhile. A request
  aborted while its KV is being copied keeps its blocks until the copy ends, so the copy can
  never land in blocks another request was given.

An engine's step is: ``work = schedule()``; run the forward pass for ``work``; then
``for seq in complete(work): append_token(seq, token, ...)`` with the token it sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from dynamo_sdk.llm.engines.base import EngineError, EngineStats
from dynamo_sdk.llm.kv.block_manager import BlockManager, NoFreeBlocksError
from dynamo_sdk.llm.kv.events import LoadMetrics
from dynamo_sdk.llm.protocol import EngineOutput, FinishReason, PreprocessedRequest, TokenLogprob

_PLACEHOLDER = 0  # token id held by a reserved KV slot until the real one is known


class OutputChannel:
    """One sequence's outputs on their way from the scheduler to its consumer (one loop).

    The hot path of every token, so lighter than an ``asyncio.Queue``: a deque and at most one
    waiter. An output the consumer has not taken yet absorbs the next one, so a slow consumer
    gets fewer, larger deltas instead of a growing backlog; an error is kept as it is.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[EngineOutput | EngineError] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: EngineOutput | EngineError) -> None:
        items = self._items
        if items and isinstance(item, EngineOutput):
            last = items[-1]
            if isinstance(last, EngineOutput) and last.finish_reason is None:
                _merge_into(last, item)  # not taken yet: the scheduler's own object
                return
        items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> EngineOutput | EngineError:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    REMOTE = "remote"  # blocks allocated, KV being computed by a prefill worker
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler (engines may subclass it to carry their own state)."""

    seq_id: str  # unique per submission: client request ids may repeat
    request: PreprocessedRequest
    prompt_len: int
    tokens: list[int]  # prompt + generated; the block manager holds KV slots for all of them
    stop_ids: frozenset[int]
    outputs: OutputChannel = field(default_factory=OutputChannel)
    state: SeqState = SeqState.WAITING
    num_computed: int = 0  # tokens whose KV is computed; the rest are prefilled before sampling
    prefilling: bool = True  # (re)admitted and not yet sampled since: prefill, not decode
    cached_tokens: int = 0  # prefix-cache hit of the latest admission before the first output
    sent_first: bool = False
    reserved: int = 0  # KV slots taken ahead for tokens still being sampled (see reserve_next)
    # called with the block table when it finishes, before the blocks are freed
    on_finish: Callable[[list[int]], None] | None = None
    onboard_checked: bool = False  # the tiers below were asked about this admission's prompt
    loading: bool = False  # KV is being copied into its blocks (REMOTE, by the onboarder)
    free_after_load: bool = False  # aborted while loading: its blocks go once the copy ends
    readmitted: bool = False  # preempted once: its next admissions are not prefix-cache queries

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class ScheduledChunk(NamedTuple):
    seq: Sequence
    num_tokens: int  # tokens computed for it this step (1 for a decode)

    @property
    def start(self) -> int:
        """Position of the chunk's first token (the sequence's computed tokens before it)."""
        return self.seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled after it."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.tokens)


class Onboarder(Protocol):
    """Loads KV from the tiers below the device cache (see the module docstring)."""

    def offer(self, seq: Sequence, hashes: list[bytes]) -> object | None:
        """A plan to load the leading ``hashes`` (the prompt's blocks past its device hit), or
        None when none of them is known below."""
        ...

    def start(self, seq: Sequence, plan: object, block_ids: list[int], first_token: int) -> None:
        """Begin copying into ``block_ids`` (the blocks of ``hashes``, the first one starting at
        token ``first_token``); when done, call ``Scheduler.finish_onboarding``."""
        ...


class Scheduler:
    """Waiting queue, running batch and the KV blocks behind them (not thread-safe: one loop)."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        context_length: int,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.context_length = context_length
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.remote: list[Sequence] = []  # waiting for their prompt's KV from elsewhere
        self.num_preemptions = 0
        """Sequences preempted for lack of KV blocks (each one is recomputed later)."""
        self.max_batch_running = 0
        self.generation_tokens = 0
        self.onboarder: Onboarder | None = None

    def stats(self, prompt_tokens_total: int) -> EngineStats:
        """The engine's stats as far as scheduling and the KV cache know them."""
        bm = self.block_manager
        queried, hits = bm.stats()
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_usage=bm.usage,
            prefix_cache_hit_rate=hits / queried if queried else 0.0,
            prompt_tokens_total=prompt_tokens_total,
            generation_tokens_total=self.generation_tokens,
            max_batch_running=self.max_batch_running,
            prefix_queried_tokens=queried,
            prefix_hit_tokens=hits,
        )

    def load_metrics(self, worker_id: int) -> LoadMetrics:
        """The load snapshot a worker publishes for the KV-aware router."""
        bm = self.block_manager
        return LoadMetrics(
            worker_id=worker_id,
            kv_usage=bm.usage,
            active_blocks=bm.num_active_blocks,
            total_blocks=bm.num_blocks,
            running=len(self.running),
            waiting=len(self.waiting),
        )

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client gone, engine stopping) and free its blocks now."""
        if seq.state is SeqState.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.seq_id)
        elif seq.state is SeqState.REMOTE:
            self.remote.remove(seq)
            if seq.loading:
                seq.free_after_load = True  # the copy still writes into its blocks
            else:
                self.block_manager.free(seq.seq_id)
        elif seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
        seq.state = SeqState.FINISHED

    def start_remote(self, seq: Sequence) -> list[int] | None:
        """Allocate a prompt's blocks now, for a prefill worker to fill (disaggregation).

        Returns the sequence's block ids (its locally cached prefix first: ``num_computed``
        tokens need no transfer), or None if the blocks are not free: prefill locally then.
        """
        bm = self.block_manager
        if not bm.can_allocate(seq.tokens):
            return None
        alloc = bm.allocate(seq.seq_id, seq.tokens, num_computed=0, query=not seq.readmitted)
        seq.state = SeqState.REMOTE
        seq.num_computed = seq.cached_tokens = alloc.num_cached_tokens
        self.remote.append(seq)
        return alloc.block_ids

    def finish_remote(self, seq: Sequence, num_tokens: int) -> None:
        """The first ``num_tokens`` tokens' KV has been written into the sequence's blocks (0:
        the transfer failed); it joins the running batch to compute the rest and sample."""
        if seq.state is not SeqState.REMOTE:
            return  # aborted meanwhile
        self.remote.remove(seq)
        # at least the last prompt token is computed here: it yields the first token's logits
        seq.num_computed = max(seq.num_computed, min(num_tokens, len(seq.tokens) - 1))
        self.block_manager.mark_computed(seq.seq_id, seq.num_computed)
        seq.state = SeqState.RUNNING
        seq.prefilling = True
        self.running.append(seq)

    def finish_onboarding(self, seq: Sequence, num_tokens: int) -> None:
        """The onboarder's copy ended with the first ``num_tokens`` tokens' KV in place."""
        seq.loading = False
        if seq.free_after_load:
            seq.free_after_load = False
            self.block_manager.free(seq.seq_id)
            return
        if seq.state is not SeqState.REMOTE:
            return
        if not seq.sent_first:
            seq.cached_tokens = max(seq.cached_tokens, min(num_tokens, len(seq.tokens) - 1))
        self.finish_remote(seq, num_tokens)

    def _try_onboarding(self, seq: Sequence) -> bool:
        """Admit the queue's head to load its prompt's KV from below (True), if worth it.

        The head is asked about once per admission, when the device can take it: while it
        cannot, it waits (FIFO) and is asked again later, since what the tiers hold for it
        then is what counts.
        """
        onboarder, bm = self.onboarder, self.block_manager
        assert onboarder is not None
        if not bm.can_allocate(seq.tokens):
            return False  # not checked yet: asked again once blocks free up
        seq.onboard_checked = True
        bs = bm.block_size
        hits, hashes = bm.match(seq.tokens)
        candidates = hashes[hits : (len(seq.tokens) - 1) // bs]  # one token is always computed
        if not candidates:
            return False
        plan = onboarder.offer(seq, candidates)
        if plan is None:
            return False
        alloc = bm.allocate(seq.seq_id, seq.tokens, num_computed=0, query=not seq.readmitted)
        self.waiting.popleft()
        seq.state = SeqState.REMOTE
        seq.num_computed = alloc.num_cached_tokens
        if not seq.sent_first:
            seq.cached_tokens = alloc.num_cached_tokens
        seq.loading = True
        self.remote.append(seq)
        first = alloc.num_cached_tokens // bs
        onboarder.start(seq, plan, alloc.block_ids[first : first + len(candidates)], first * bs)
        return True

    def fail_all(self, error: EngineError) -> None:
        for seq in [*self.running, *self.waiting, *self.remote]:
            self.abort(seq)
            seq.outputs.put(error)

    def fail(self, seq: Sequence, error: EngineError) -> None:
        """End one sequence with ``error`` (its consumer raises it) and free its blocks,
        whatever it was doing; every other sequence goes on as it was. Safe on a sequence an
        exception left half-updated (finished in the scheduler, blocks not yet freed)."""
        if seq.state is not SeqState.FINISHED:
            try:
                self.abort(seq)
            except (ValueError, KeyError):  # half-applied when the error struck: tidy up
                for queue in (self.running, self.remote, self.waiting):
                    if seq in queue:
                        queue.remove(seq)
                seq.state = SeqState.FINISHED
                with contextlib.suppress(KeyError):  # its blocks, unless already freed
                    self.block_manager.free(seq.seq_id)
        seq.outputs.put(error)

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's work: running sequences first, then FIFO admissions."""
        while True:
            work = self._schedule()
            if work or not self._fail_unadmittable():
                return work

    def _fail_unadmittable(self) -> bool:
        """With nothing running, fail the queue's head if it can never be admitted (more
        tokens than the whole cache: a prompt an engine let through, or a sequence that grew
        past the cache before it was preempted), so the queue behind it goes on."""
        if self.running or self.remote or not self.waiting:
            return False
        bm = self.block_manager
        head = self.waiting[0]
        need = -(-len(head.tokens) // bm.block_size)
        if need <= bm.num_blocks:
            return False
        self.fail(head, EngineError(
            f"request {head.request.request_id}: {len(head.tokens)} tokens need {need} KV "
            f"blocks; the cache has {bm.num_blocks}"
        ))  # fmt: skip
        return True

    def _unadmittable(self) -> bool:
        """The queue's head can never be admitted and nothing else runs (`schedule` fails it)."""
        if self.running or not self.waiting:
            return False
        bm = self.block_manager
        return -(-len(self.waiting[0].tokens) // bm.block_size) > bm.num_blocks

    def _schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        work: list[ScheduledChunk] = []
        bm = self.block_manager
        for seq in self.running:
            if budget == 0:
                break
            n = min(len(seq.tokens) - seq.num_computed, budget)
            work.append(ScheduledChunk(seq, n))
            bm.mark_computed(seq.seq_id, seq.num_computed + n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.onboarder is not None and not seq.onboard_checked:
                if self._try_onboarding(seq):
                    continue
            if not bm.can_allocate(seq.tokens):
                break  # FIFO: later requests do not overtake the head of the queue
            try:
                alloc = bm.allocate(
                    seq.seq_id, seq.tokens, num_computed=0, query=not seq.readmitted
                )
            except NoFreeBlocksError:
                break
            self.waiting.popleft()
            seq.state = SeqState.RUNNING
            seq.num_computed = alloc.num_cached_tokens
            seq.prefilling = True
            if not seq.sent_first:
                seq.cached_tokens = alloc.num_cached_tokens
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            work.append(ScheduledChunk(seq, n))
            bm.mark_computed(seq.seq_id, seq.num_computed + n)
            budget -= n
        self.max_batch_running = max(self.max_batch_running, len(self.running))
        # Nothing to do is possible only while blocks wait for KV from elsewhere (a prefill
        # worker, the tiers below); otherwise it cannot happen, and a stall would be worse.
        if not work and self.has_work and not self.remote and not self._unadmittable():
            raise RuntimeError(
                f"scheduler made no progress ({len(self.waiting)} waiting, "
                f"{bm.num_free_blocks} free blocks)"
            )
        return work

    def complete(self, work: list[ScheduledChunk]) -> list[Sequence]:
        """Apply a finished step; returns the sequences that now need a sampled token.

        Sequences aborted or preempted while the step ran are skipped.
        """
        ready: list[Sequence] = []
        for seq, n in work:
            if seq.state is not SeqState.RUNNING:
                continue
            seq.num_computed += n
            if seq.num_computed == len(seq.tokens):
                ready.append(seq)
        return ready

    def append_token(
        self,
        seq: Sequence,
        token: int,
        logprob: float | None = None,
        top_logprobs: list[TokenLogprob] | None = None,
    ) -> EngineOutput | None:
        """Stream a sampled token, then finish the sequence or grow its KV (maybe preempting).

        Returns the output streamed, or None if `seq` was preempted earlier in this step (its
        sample is dropped: it recomputes and samples again).
        """
        if seq.state is not SeqState.RUNNING:
            return None
        stop = seq.request.stop
        seq.tokens.append(token)
        seq.prefilling = False
        self.generation_tokens += 1
        generated = seq.num_generated
        finish: FinishReason | None = None
        if token in seq.stop_ids and generated > stop.min_tokens:
            finish = "stop"
        elif generated >= stop.max_tokens or len(seq.tokens) >= self.context_length:
            finish = "length"
        out = EngineOutput(token_ids=[token], finish_reason=finish)
        if not seq.sent_first:
            seq.sent_first = True
            out.cached_tokens = seq.cached_tokens
        if logprob is not None:
            out.logprobs = [logprob]
            out.top_logprobs = [top_logprobs or []]
        seq.outputs.put(out)
        if finish is not None:
            self.running.remove(seq)
            if seq.on_finish is not None:
                seq.on_finish(self.block_manager.block_table(seq.seq_id))
            self.block_manager.free(seq.seq_id)
            seq.state = SeqState.FINISHED
            return out
        if seq.reserved:  # its slot was taken when the next step was launched ahead
            self.block_manager.set_token(seq.seq_id, len(seq.tokens) - 1, token)
            seq.reserved -= 1
            return out
        while seq.state is SeqState.RUNNING:
            try:
                self.block_manager.append_token(seq.seq_id, token)
                break
            except NoFreeBlocksError:
                self._preempt(self.running[-1])  # possibly `seq` itself: then it re-prefills
        return out

    def reserve_next(self, seqs: list[Sequence]) -> list[ScheduledChunk] | None:
        """Plan the next decode step before this one's tokens are known (async scheduling).

        Each sequence gets the KV slot of the token being sampled now (a placeholder until
        ``append_token`` fills it) and one decode chunk for it; None, with nothing changed, if
        that is not possible without preempting or if a sequence would outgrow its context.
        """
        bm, bs = self.block_manager, self.block_manager.block_size
        need = 0
        for seq in seqs:
            if seq.state is not SeqState.RUNNING or seq.reserved:
                return None
            n = len(seq.tokens) + 1  # tokens once the pending one is appended
            if n >= self.context_length:
                return None
            need += (n - 1) % bs == 0  # the pending token opens a new block
        if need > bm.num_free_blocks:
            return None
        for seq in seqs:
            bm.append_token(seq.seq_id, _PLACEHOLDER)
            seq.reserved += 1
        return [ScheduledChunk(seq, 1) for seq in seqs]

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it first, to be recomputed (vLLM v1)."""
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.state = SeqState.WAITING
        seq.num_computed = 0
        seq.reserved = 0
        seq.onboard_checked = False  # its blocks may have gone below meanwhile
        seq.readmitted = True  # its recompute is not a new prompt: hit rates leave it out
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


async def stream_outputs(
    seq: Sequence, abort: Callable[[Sequence], None]
) -> AsyncGenerator[EngineOutput, None]:
    """Yield a sequence's deltas until it finishes; closing early calls ``abort(seq)``.

    Outputs the consumer has not picked up yet are merged into one delta, so a slow consumer
    gets fewer, larger messages instead of a growing backlog.
    """
    try:
        while True:
            item = await seq.outputs.get()
            if isinstance(item, EngineError):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        if seq.state is not SeqState.FINISHED:
            abort(seq)


def _merge_into(out: EngineOutput, nxt: EngineOutput) -> None:
    """Append delta `nxt` to `out` (both built by the scheduler, so mutating is safe)."""
    out.token_ids.extend(nxt.token_ids)
    if out.logprobs is not None and nxt.logprobs is not None:
        out.logprobs.extend(nxt.logprobs)
    if out.top_logprobs is not None and nxt.top_logprobs is not None:
        out.top_logprobs.extend(nxt.top_logprobs)
    out.finish_reason = nxt.finish_reason
