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
import time
from collections.abc import AsyncIterator
from typing import Any

from dynamo_sdk import (
    ServiceConfig,
    async_on_shutdown,
    async_on_start,
    dynamo_context,
    endpoint,
    service,
)
from dynamo_sdk.llm.engines.base import Engine, EngineStats
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.kv.events import LoadMetrics
from dynamo_sdk.llm.kv.publisher import KvPublisher
from dynamo_sdk.llm.kv.vllm_bridge import VllmKvEventBridge, vllm_kv_event_args
from dynamo_sdk.llm.metrics import WorkerMetrics
from dynamo_sdk.llm.model_registry import register_model
from dynamo_sdk.llm.model_resolver import resolve_model
from dynamo_sdk.llm.protocol import EngineOutput, ModelEntry, PreprocessedRequest
from dynamo_sdk.serve.embedded import free_port

log = logging.getLogger("dynamo.llm.worker")

FRAMEWORK_KEYS = {"engine", "model", "served_model_name", "stats_interval"}


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
        async for output in self.engine.generate(request):
            yield output

    @endpoint()
    async def stats(self, _: str) -> EngineStats:
        assert self.engine is not None
        return self.engine.stats()

    @async_on_shutdown
    async def stop(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stats_task
        if self.kv_bridge is not None:
            await self.kv_bridge.stop()
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
