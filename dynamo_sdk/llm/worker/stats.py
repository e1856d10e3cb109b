"""A worker's periodic report: one log line while busy, and the Prometheus gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from dynamo_sdk.llm.engines.base import Engine, EngineStats
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
                    "KV cache %.1f%%, %s",
                    prompt_tps, gen_tps, stats.running, stats.waiting,
                    100 * stats.kv_usage, hit_rates(last, stats),
                )  # fmt: skip
            last, last_at = stats, now


def hit_rates(before: EngineStats, now: EngineStats) -> str:
    """The prefix-cache hit rate per tier over an interval, in vLLM's words:
    ``Prefix cache hit rate: GPU: 80.00%, CPU: 5.00%, DISK: 0.00%, SHARED: 0.00%``."""
    queried = now.prefix_queried_tokens - before.prefix_queried_tokens
    if queried <= 0:  # nothing looked up since: the rates since start
        queried, before = now.prefix_queried_tokens, EngineStats()

    def pct(hit: int) -> str:
        return f"{100 * hit / queried:.2f}%" if queried > 0 else "0.00%"

    parts = [f"GPU: {pct(now.prefix_hit_tokens - before.prefix_hit_tokens)}"]
    earlier = {t.medium: t.hit_tokens for t in before.kv_tiers}
    for tier in now.kv_tiers:
        parts.append(f"{tier.medium}: {pct(tier.hit_tokens - earlier.get(tier.medium, 0))}")
    return "Prefix cache hit rate: " + ", ".join(parts)
