"""Worker: one engine behind the engine contract (token ids in, token id deltas out).

The engine is chosen in YAML (`engine: vllm | torch | mocker | echo`); everything else in the
section that the engine understands is passed through (vLLM engine arguments, the torch
engine's knobs, the mocker's timing model, echo's rate). The worker announces
its model in etcd so Frontends list it and Processors know its context length, and it logs and
exports its load every `stats_interval` seconds while busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_sdk import (
    ServiceConfig,
    async_on_shutdown,
    async_on_start,
    dynamo_context,
    endpoint,
    service,
)
from dynamo_sdk.llm.disagg.kv_storage import (
    PARAMS_KEY,
    remove_stored,
    storage_key,
    storage_root,
    sweep_own,
)
from dynamo_sdk.llm.disagg.policy import DisaggConfig
from dynamo_sdk.llm.disagg.protocol import KvLayout, RemotePrefillRequest, transfer_key
from dynamo_sdk.llm.disagg.queue import PrefillQueue
from dynamo_sdk.llm.engines.base import Engine, EngineError, EngineStats, PrefillSlots
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.kv.events import LoadMetrics
from dynamo_sdk.llm.kv.publisher import KvPublisher
from dynamo_sdk.llm.kv.vllm_bridge import VllmKvEventBridge, vllm_kv_event_args
from dynamo_sdk.llm.metrics import WorkerMetrics
from dynamo_sdk.llm.model_registry import register_model
from dynamo_sdk.llm.model_resolver import resolve_model
from dynamo_sdk.llm.protocol import EngineOutput, ModelEntry, PreprocessedRequest
from dynamo_sdk.serve.embedded import free_port

if TYPE_CHECKING:
    # PyTorch comes with it: imported only by workers that take KV transfers, so that the
    # Frontend and Processor processes (which import this module through the graph) start
    # without loading torch.
    from dynamo_sdk.llm.disagg.transfer import KvReceiver

log = logging.getLogger("dynamo.llm.worker")

FRAMEWORK_KEYS = {"engine", "model", "served_model_name", "stats_interval", *DisaggConfig.KEYS}


@service(dynamo={"namespace": "dynamo"}, resources={"gpu": 1}, workers=1)
class Worker:
    def __init__(self) -> None:
        self.config: dict[str, Any] = ServiceConfig.get_instance().for_service("Worker")
        self.engine_name = str(self.config.get("engine", "vllm"))
        self.model = str(self.config.get("model", "auto"))
        self.stats_interval = float(self.config.get("stats_interval", 5.0))
        self.engine: Engine | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.metrics: WorkerMetrics | None = None
        self.kv_publisher: KvPublisher | None = None
        self.kv_bridge: VllmKvEventBridge | None = None
        self.disagg = DisaggConfig.from_section(self.config)
        self.kv_receiver: KvReceiver | None = None
        self.prefill_queue: PrefillQueue | None = None
        self.kv_via = "blocks"  # or "connector": a vLLM engine loads the KV itself
        self.kv_storage = ""  # the connector's shared folder ("connector" only)
        self._loading: set[str] = set()  # storage keys of requests that may still load
        self._sweep_task: asyncio.Task[None] | None = None
        self.disagg_counts = {
            "remote": 0,  # prefills sent to the prefill queue
            "local_short": 0,  # few uncached tokens: computed here
            "local_queue_full": 0,  # the prefill queue was too deep: computed here
            "local_no_blocks": 0,  # no free blocks to offer a prefill worker: computed here
            "fallback": 0,  # sent, but no KV came back (failure, timeout): computed here
            "remote_tokens": 0,  # prompt tokens whose KV arrived from prefill workers
            # KV announced by a prefill worker that the engine did not load (vLLM connector:
            # storage not shared, or the prompt was cached here meanwhile): computed here
            "remote_unloaded": 0,
        }

    @async_on_start
    async def start(self) -> None:
        path = None
        if self.engine_name != "echo":
            path = str(await asyncio.to_thread(resolve_model, self.model))
        served = str(self.config.get("served_model_name") or (path or self.model))
        engine_config = {k: v for k, v in self.config.items() if k not in FRAMEWORK_KEYS}
        kv_events_port = None
        if self.engine_name == "vllm" and engine_config.pop("kv_events", False):
            kv_events_port = free_port()
            engine_config.update(vllm_kv_event_args(kv_events_port))
        self.engine = create_engine(self.engine_name, path, engine_config)
        publisher_pending: list[Any] = []
        if kv_events_port is not None:  # bound before vLLM starts, so it can connect at once
            self.kv_bridge = VllmKvEventBridge(kv_events_port, publisher_pending.extend)
            await self.kv_bridge.start()
        await self.engine.start()
        runtime = dynamo_context.runtime
        assert runtime is not None
        await register_model(
            runtime,
            ModelEntry(
                name=served,
                namespace=Worker.namespace,
                component=Worker.name,
                endpoint="generate",
                context_length=self.engine.context_length,
                path=path or "",
            ),
        )
        if hasattr(self.engine, "on_kv_events") or kv_events_port is not None:
            # Engines whose KV blocks we can follow feed the KV-aware router.
            self.kv_publisher = KvPublisher(runtime, Worker.namespace, Worker.name, self._load)
            if self.kv_bridge is not None:
                self.kv_bridge.on_events = self.kv_publisher.on_events
                if publisher_pending:
                    self.kv_publisher.on_events(publisher_pending)
            else:
                self.engine.on_kv_events(self.kv_publisher.on_events)  # type: ignore[attr-defined]
            await self.kv_publisher.start()
        if self.disagg.remote_prefill:
            await self._start_disagg(runtime)
        self.metrics = WorkerMetrics(served, global_registry=True)
        self._stats_task = asyncio.create_task(self._report_stats())
        log.info(
            "serving %s with the %s engine (context %d)",
            served,
            self.engine_name,
            self.engine.context_length,
        )

    @endpoint()
    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        assert self.engine is not None
        if self.prefill_queue is not None and self.kv_via == "connector":
            async for output in self._generate_via_connector(request):
                yield output
            return
        remote = await self._remote_prefill(request) if self.prefill_queue is not None else None
        if remote is None:
            async for output in self.engine.generate(request):
                yield output
            return
        stream = self.engine.generate(request, remote_prefill=remote)  # type: ignore[call-arg]
        async for output in stream:
            if output.cached_tokens is not None and not remote.started:
                self.disagg_counts["local_no_blocks"] += 1  # no free blocks to offer: local
            yield output

    @endpoint()
    async def stats(self, _: str) -> EngineStats:
        assert self.engine is not None
        return self.engine.stats()

    @endpoint()
    async def disagg_stats(self, _: str) -> dict[str, int]:
        """Conditional-disaggregation decisions and transfers so far."""
        return dict(self.disagg_counts)

    async def _start_disagg(self, runtime: Any) -> None:
        """Receive KV from prefill workers; advertise where (and in what layout) in etcd.

        The torch engine takes KV into its blocks (``write_kv``). A vLLM engine cannot: its KV
        arrives through its KV connector, so its receiver only takes notices ("the KV is
        stored, load it"), and the layout it advertises is checked against the prefill
        worker's before anything is computed.
        """
        engine: Any = self.engine
        if not hasattr(engine, "kv_layout"):
            raise EngineError(
                f"remote_prefill needs an engine that takes KV transfers (torch, or vllm with "
                f"a KV connector), not {self.engine_name}"
            )
        from dynamo_sdk.llm.disagg.transfer import KvReceiver

        layout = KvLayout(**engine.kv_layout())
        host = os.environ.get("DYN_KV_TRANSFER_HOST", "127.0.0.1")
        if hasattr(engine, "write_kv"):
            self.kv_receiver = KvReceiver(layout, engine.write_kv, host=host,
                                          cache=engine.kv_cache_tensor())  # fmt: skip
        else:
            try:
                self.kv_storage = storage_root(self.config.get("kv_transfer_config"))
            except ValueError as exc:
                raise EngineError(str(exc)) from exc
            self.kv_via = "connector"
            self.kv_receiver = KvReceiver(layout, _no_block_writes, host=host)
        endpoint_info = await self.kv_receiver.start()
        await runtime.put_leased(
            transfer_key(Worker.namespace, runtime.instance_id),
            msgspec.msgpack.encode(endpoint_info),
        )
        self.prefill_queue = PrefillQueue(runtime.nc, Worker.namespace)
        await self.prefill_queue.ensure()
        self.instance_id = runtime.instance_id
        if self.kv_via == "connector":
            self._sweep_task = asyncio.create_task(self._sweep_storage())
        via = {"connector": f" (KV through the vLLM connector, stored in {self.kv_storage})",
               "blocks": " (and through CUDA IPC)" if endpoint_info.cuda_ipc else ""}  # fmt: skip
        log.info("disaggregated prefill on: KV notices at %s:%d%s", host, endpoint_info.port,
                 via[self.kv_via])  # fmt: skip

    async def _remote_prefill(self, request: PreprocessedRequest) -> _RemotePrefill | None:
        """Apply the conditional-disaggregation rule; a prefill callable if remote."""
        if not await self._decide_remote(request):
            return None
        return _RemotePrefill(self, request)

    async def _decide_remote(self, request: PreprocessedRequest) -> bool:
        """The conditional-disaggregation rule, logged and counted (except "remote", counted
        once a prefill is actually sent).

        vLLM does not let callers look into its prefix cache, so for a vLLM engine every prompt
        token counts as uncached (a prompt cached here still goes remote when it is long; the
        connector then loads nothing and vLLM uses its own cache).
        """
        assert self.engine is not None and self.prefill_queue is not None
        tokens = request.token_ids
        cached_prefix = getattr(self.engine, "cached_prefix_tokens", None)
        uncached = len(tokens) - (cached_prefix(tokens) if cached_prefix is not None else 0)
        depth = 0
        if uncached > self.disagg.max_local_prefill_length:
            depth = await self.prefill_queue.depth()
        decision = self.disagg.decide(uncached, depth)
        log.debug("%s: %s prefill (%d uncached tokens, queue %d)",
                  request.request_id, decision, uncached, depth)  # fmt: skip
        if decision != "remote":
            self.disagg_counts[decision] += 1
            return False
        return True

    async def _generate_via_connector(
        self, request: PreprocessedRequest
    ) -> AsyncIterator[EngineOutput]:
        """Disaggregated prefill for a vLLM engine: a prefill worker runs the prompt with the
        KV connector saving it, notifies, and this engine then loads it as an external prefix
        hit (computing only the rest). No notice within ``prefill_timeout``: prefill locally.
        """
        engine: Any = self.engine
        params: dict[str, Any] | None = None
        key = ""
        if await self._decide_remote(request):
            key = await self._prefill_via_connector(request)
            if key:
                params = {PARAMS_KEY: {"load": key}}
        report: dict[str, Any] = {}
        try:
            async for output in engine.generate(request, params, report.update):
                yield output
        finally:
            self._loading.discard(key)
        if params is not None:
            loaded = int((report.get(PARAMS_KEY) or {}).get("loaded", 0))
            self.disagg_counts["remote_tokens"] += loaded
            if not loaded:
                self.disagg_counts["remote_unloaded"] += 1

    async def _prefill_via_connector(self, request: PreprocessedRequest) -> str:
        """Queue the prompt for a prefill worker and wait for its notice; the storage key to
        load from, or "" when the prompt must be prefilled here."""
        queue, receiver, counts = self.prefill_queue, self.kv_receiver, self.disagg_counts
        assert queue is not None and receiver is not None
        counts["remote"] += 1
        transfer_id = f"{request.request_id}:{uuid.uuid4().hex[:12]}"
        key = storage_key(self.instance_id, transfer_id)
        receiver.expect(transfer_id, [])
        job = RemotePrefillRequest(
            request, self.instance_id, [], 0, transfer_id, kv_via="connector"
        )
        self._loading.add(key)
        try:
            await queue.put(job)
            stored = await receiver.wait(transfer_id, self.disagg.prefill_timeout)
        except BaseException:
            receiver.forget(transfer_id)
            self._loading.discard(key)
            remove_stored(self.kv_storage, key)  # the engine never saw this key
            raise
        if stored:
            return key
        log.warning("%s: no KV from a prefill worker; prefilling locally", transfer_id)
        counts["fallback"] += 1
        self._loading.discard(key)
        remove_stored(self.kv_storage, key)  # whatever a failed prefill worker left
        return ""

    async def _sweep_storage(self) -> None:
        """Now and then, delete this worker's stored KV that no request will load (what a late
        prefill worker wrote after its request stopped waiting), so storage stays bounded."""
        min_age = max(60.0, 2 * self.disagg.prefill_timeout)
        while True:
            await asyncio.sleep(min_age / 2)
            try:
                removed = await asyncio.to_thread(
                    sweep_own, self.kv_storage, self.instance_id, set(self._loading), min_age
                )
            except OSError:
                log.warning("sweeping %s failed", self.kv_storage, exc_info=True)
                continue
            if removed:
                log.info("removed %d stale stored KV folder(s) from %s", removed, self.kv_storage)

    @async_on_shutdown
    async def stop(self) -> None:
        for task in (self._stats_task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.kv_bridge is not None:
            await self.kv_bridge.stop()
        if self.kv_receiver is not None:
            await self.kv_receiver.stop()
        if self.kv_publisher is not None:
            await self.kv_publisher.stop()
        if self.engine is not None:
            await self.engine.shutdown()

    def _load(self, worker_id: int) -> LoadMetrics:
        """Load for the router: the engine's own when it has one, else from its stats."""
        assert self.engine is not None
        own = getattr(self.engine, "load_metrics", None)
        if own is not None:
            return own(worker_id)  # type: ignore[no-any-return]
        stats = self.engine.stats()
        return LoadMetrics(worker_id, stats.kv_usage, 0, 0, stats.running, stats.waiting)

    async def _report_stats(self) -> None:
        assert self.engine is not None and self.metrics is not None
        last = self.engine.stats()
        last_at = time.monotonic()
        while True:
            await asyncio.sleep(self.stats_interval)
            now, stats = time.monotonic(), self.engine.stats()
            elapsed = max(now - last_at, 1e-6)
            prompt_tps = (stats.prompt_tokens_total - last.prompt_tokens_total) / elapsed
            gen_tps = (stats.generation_tokens_total - last.generation_tokens_total) / elapsed
            self.metrics.update(stats, prompt_tps, gen_tps)
            if stats.running or stats.waiting or prompt_tps or gen_tps:
                log.info(
                    "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                    "KV cache %.1f%%, prefix cache hit %.1f%%",
                    prompt_tps,
                    gen_tps,
                    stats.running,
                    stats.waiting,
                    100 * stats.kv_usage,
                    100 * stats.prefix_cache_hit_rate,
                )
            last, last_at = stats, now


def _no_block_writes(block_ids: list[int], kv: Any) -> None:
    """A vLLM decode worker's receiver takes notices only: its KV comes through vLLM's connector."""
    raise EngineError("this decode worker (vLLM) takes KV through its KV connector, not blocks")


class _RemotePrefill:
    """Sends one request's prefill to the queue and waits for its KV (a ``RemotePrefill``)."""

    def __init__(self, worker: Worker, request: PreprocessedRequest) -> None:
        self.worker = worker
        self.request = request
        self.started = False

    async def __call__(self, slots: PrefillSlots) -> int:
        self.started = True
        w = self.worker
        queue, receiver, counts = w.prefill_queue, w.kv_receiver, w.disagg_counts
        assert queue is not None and receiver is not None
        counts["remote"] += 1
        transfer_id = f"{self.request.request_id}:{uuid.uuid4().hex[:12]}"
        receiver.expect(transfer_id, slots.block_ids)
        first = slots.num_cached_tokens // slots.block_size
        job = RemotePrefillRequest(self.request, w.instance_id, slots.block_ids, first, transfer_id)
        try:
            await queue.put(job)
        except Exception:
            receiver.forget(transfer_id)
            raise
        written = await receiver.wait(transfer_id, w.disagg.prefill_timeout)
        if not written:
            log.warning("%s: no KV from a prefill worker; prefilling locally", transfer_id)
        if written:
            counts["remote_tokens"] += written
        else:
            counts["fallback"] += 1
        return written
