"""A worker's periodic report: one log line while busy, and the Prometheus gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from dynamo_sdk.llm.engines.base import Engine
from dynamo_sdk.llm.metrics import WorkerMetrics

log = logging.getLogger("dynamo.llm.worker")


class StatsReporter:
    """Every `interval` seconds: throughput since the last report, load, KV usage, hit rate."""

    def __init__(self, engine: Engine, model: str, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self.metrics = WorkerMetrics(model, global_registry=True)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _run(self) -> None:
        last, last_at = self.engine.stats(), time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now, stats = time.monotonic(), self.engine.stats()
            elapsed = max(now - last_at, 1e-6)
            prompt_tps = (stats.prompt_tokens_total - last.prompt_tokens_total) / elapsed
            gen_tps = (stats.generation_tokens_total - last.generation_tokens_total) / elapsed
            self.metrics.update(stats, prompt_tps, gen_tps)
            if stats.running or stats.waiting or prompt_tps or gen_tps:
                log.info(
                    "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                    "KV cache %.1f%%, prefix cache hit %.1f%%",
                    prompt_tps, gen_tps, stats.running, stats.waiting,
                    100 * stats.kv_usage, 100 * stats.prefix_cache_hit_rate,
                )  # fmt: skip
            last, last_at = stats, now
