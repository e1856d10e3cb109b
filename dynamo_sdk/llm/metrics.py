"""Prometheus metrics of the Frontend and of workers, each in its own registry.

A registry per object (not the global one) keeps several apps in one process, as in tests and
`dynamo run`, from colliding.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from dynamo_sdk.llm.engines.base import EngineStats

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

    def update(self, stats: EngineStats, prompt_tps: float, gen_tps: float) -> None:
        m = self.model
        self.running.labels(m).set(stats.running)
        self.waiting.labels(m).set(stats.waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
        self.prefix_hit.labels(m).set(stats.prefix_cache_hit_rate)
        self.prompt_tps.labels(m).set(prompt_tps)
        self.gen_tps.labels(m).set(gen_tps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
