"""Prometheus metrics of the Frontend and of workers, each in its own registry.

A registry per object (not the global one) keeps several apps in one process, as in tests and
`dynamo run`, from colliding.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dynamo_frontend_requests",
            "HTTP requests by endpoint, model and status code",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "dynamo_frontend_inflight_requests", "Requests being served", registry=self.registry
        )
        self.ttft = Histogram(
            "dynamo_frontend_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "dynamo_frontend_inter_token_latency_seconds",
            "Time between streamed deltas",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.output_tokens = Counter(
            "dynamo_frontend_output_tokens", "Completion tokens returned", registry=self.registry
        )
        self.input_tokens = Counter(
            "dynamo_frontend_input_tokens", "Prompt tokens received", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerMetrics:
    """The engine's load, refreshed from `EngineStats` snapshots."""

    def __init__(self, model: str, global_registry: bool = False) -> None:
        # A served worker uses the process-wide registry, which its health port exposes.
        self.registry = REGISTRY if global_registry else CollectorRegistry()
        labels = ["model"]
        self.model = model
        self.running = Gauge(
            "dynamo_worker_running_requests", "Running", labels, registry=self.registry
        )
        self.waiting = Gauge(
            "dynamo_worker_waiting_requests", "Waiting", labels, registry=self.registry
        )
        self.kv_usage = Gauge(
            "dynamo_worker_kv_cache_usage_ratio",
            "KV blocks in use (0-1)",
            labels,
            registry=self.registry,
        )
        self.prefix_hit = Gauge(
            "dynamo_worker_prefix_cache_hit_ratio",
            "Prefix cache hit rate",
            labels,
            registry=self.registry,
        )
        self.prompt_tps = Gauge(
            "dynamo_worker_prompt_tokens_per_second",
            "Prompt throughput",
            labels,
            registry=self.registry,
        )
        self.gen_tps = Gauge(
            "dynamo_worker_generation_tokens_per_second",
            "Generation throughput",
            labels,
            registry=self.registry,
        )

        self.tiers = KvTierCollector(model)
        self.registry.register(self.tiers)

    def update(self, stats: EngineStats, prompt_tps: float, gen_tps: float) -> None:
        self.tiers.update(stats)
        m = self.model
        self.running.labels(m).set(stats.running)
        self.waiting.labels(m).set(stats.waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
        self.prefix_hit.labels(m).set(stats.prefix_cache_hit_rate)
        self.prompt_tps.labels(m).set(prompt_tps)
        self.gen_tps.labels(m).set(gen_tps)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_TIER_COUNTERS = (
    ("hit_tokens", "Prompt tokens loaded from the tier instead of recomputed"),
    ("offload_blocks", "Blocks copied into the tier"),
    ("offload_bytes", "KV bytes copied into the tier"),
    ("onboard_blocks", "Blocks loaded from the tier to the device"),
    ("onboard_bytes", "KV bytes loaded from the tier to the device"),
    ("evicted_blocks", "Blocks the tier evicted to make room"),
    ("skipped_blocks", "Blocks not copied in because every slot was busy (a write backlog)"),
    ("corrupt_blocks", "Blocks that failed their checks on load (deleted, recomputed)"),
    ("errors", "Tier operations that failed"),
    ("declined_loads", "Prompts whose blocks in the tier were recomputed: reading was slower"),
)


class KvTierCollector(Collector):
    """The KV tiers' usage and totals (`KvTierStats`), exported from the latest snapshot.

    The engine keeps its own totals; Prometheus counters cannot be set, so this collector
    builds the metric families at scrape time instead (what prometheus-client documents for
    values that live elsewhere).
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._tiers: list[KvTierStats] = []
        self._queried = 0

    def update(self, stats: EngineStats) -> None:
        self._tiers = list(stats.kv_tiers)
        self._queried = stats.prefix_queried_tokens

    def describe(self) -> Iterator[Metric]:
        return iter(())  # values appear only once tiers exist; no fixed description

    def collect(self) -> Iterator[Metric]:
        if not self._tiers:
            return
        labels = ["model", "tier"]
        prefix = "dynamo_worker_kv_tier"
        capacity = GaugeMetricFamily(
            f"{prefix}_capacity_blocks", "Blocks the tier can hold (0: unbounded)", labels=labels
        )
        used = GaugeMetricFamily(f"{prefix}_used_blocks", "Blocks the tier holds", labels=labels)
        enabled = GaugeMetricFamily(f"{prefix}_enabled", "1 while the tier works", labels=labels)
        hit = GaugeMetricFamily(
            f"{prefix}_hit_ratio",
            "Share of queried prompt tokens loaded from the tier",
            labels=labels,
        )
        counters = {
            name: CounterMetricFamily(f"{prefix}_{name}", text, labels=labels)
            for name, text in _TIER_COUNTERS
        }
        load = SummaryMetricFamily(
            f"{prefix}_load_seconds", "Time spent loading blocks from the tier", labels=labels
        )
        for t in self._tiers:
            values = [self.model, t.medium.lower()]
            capacity.add_metric(values, t.capacity_blocks)
            used.add_metric(values, t.used_blocks)
            enabled.add_metric(values, 1.0 if t.enabled else 0.0)
            hit.add_metric(values, t.hit_tokens / self._queried if self._queried else 0.0)
            for name, family in counters.items():
                family.add_metric(values, getattr(t, name))
            load.add_metric(values, count_value=t.loads, sum_value=t.load_seconds)
        yield from (capacity, used, enabled, hit, *counters.values(), load)
