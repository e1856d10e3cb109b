"""`LLMWorker`: one engine behind the runtime's `generate` endpoint.

Every request is checked against the served model before the engine sees it
(`check_request`: token ids inside the vocabulary, the prompt inside the context length,
logprobs up to `max_logprobs`): the endpoint is reachable by anyone on NATS, past the
Frontend, and a refused request comes back to its caller as an `invalid_request` error frame.

Start-up: resolve the model, build and start the engine the config names, turn on
disaggregated prefill if asked (`DecodeRole`), publish the engine's KV events and load when it
has KV events (so the KV-aware router can follow it), announce the model in etcd (the
Frontend lists it and learns its tokenizer, context length and KV block size), and report
stats every `stats_interval` seconds while busy. Everything engine-specific is asked of the
engine's declared capabilities; this class is the same for every engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from dynamo_sdk.llm.engines.base import Engine, EngineStats, RequestLimits, check_request
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.kv.events import LoadMetrics
from dynamo_sdk.llm.kv.publisher import KvPublisher
from dynamo_sdk.llm.model_registry import register_model
from dynamo_sdk.llm.model_resolver import resolve_model, served_name
from dynamo_sdk.llm.protocol import EngineOutput, ModelEntry, PreprocessedRequest
from dynamo_sdk.llm.worker.config import WorkerConfig
from dynamo_sdk.llm.worker.decode import DecodeRole
from dynamo_sdk.llm.worker.stats import StatsReporter
from dynamo_sdk.runtime import DistributedRuntime

log = logging.getLogger("dynamo.llm.worker")


class LLMWorker:
    """Serves one engine (see module docstring)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.decode: DecodeRole | None = None
        self.publisher: KvPublisher | None = None
        self.reporter: StatsReporter | None = None
        self.limits: RequestLimits | None = None

    async def start(
        self, runtime: DistributedRuntime, namespace: str, component: str, endpoint: str
    ) -> None:
        keys = self.config.keys
        path = None
        if keys.engine != "echo":  # the mocker reads its vocabulary from the model's tokenizer
            path = str(await asyncio.to_thread(resolve_model, keys.model))
        served = served_name(keys.model, path, keys.served_model_name)
        engine = create_engine(keys.engine, path, self.config.engine)
        await engine.start()
        self.engine = engine
        self.limits = RequestLimits(
            context_length=engine.context_length,
            vocab_size=engine.vocab_size or model_vocab_size(path),
            max_logprobs=keys.max_logprobs,
        )
        if keys.remote_prefill:
            self.decode = DecodeRole(engine, keys.disagg())
            await self.decode.start(runtime, namespace)
        events = engine.kv_events()
        if events is not None:
            self.publisher = KvPublisher(
                runtime, namespace, component, self._load, snapshot=engine.kv_snapshot
            )
            events.subscribe(self.publisher.on_events, replay=True)  # what start announced
            await self.publisher.start()
        await register_model(
            runtime,
            ModelEntry(
                name=served,
                namespace=namespace,
                component=component,
                endpoint=endpoint,
                context_length=engine.context_length,
                path=path or "",
                kv_block_size=engine.kv_block_size(),
                kv_events=events is not None,
            ),
        )
        self.reporter = StatsReporter(engine, served, keys.stats_interval)
        self.reporter.start()
        log.info("serving %s with the %s engine (context %d)", served, keys.engine,
                 engine.context_length)  # fmt: skip

    def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        """The engine's stream for ``request``; raises `InvalidPromptError` at once for a
        request the model cannot serve (see the module docstring)."""
        assert self.engine is not None and self.limits is not None
        check_request(request, self.limits)
        if self.decode is not None:
            return self.decode.generate(request)
        return self.engine.generate(request)

    def shutdown_reserve(self) -> float:
        """Seconds `stop()` needs: the engine's stop, and one for the rest (cancelled streams
        unwinding, the publisher)."""
        return self.engine.stop_timeout + 1.0 if self.engine is not None else 0.0

    def stats(self) -> EngineStats:
        assert self.engine is not None
        return self.engine.stats()

    def alive(self) -> bool:
        """The worker's liveness: its engine can still serve (`Engine.healthy`)."""
        return self.engine is None or self.engine.healthy()

    def disagg_stats(self) -> dict[str, int]:
        """Conditional-disaggregation decisions and transfers so far (empty when off)."""
        return self.decode.stats() if self.decode is not None else {}

    def _load(self, worker_id: int) -> LoadMetrics:
        assert self.engine is not None
        return self.engine.load_metrics(worker_id)

    async def stop(self) -> None:
        for part in (self.reporter, self.decode, self.publisher):
            if part is not None:
                await part.stop()
        if self.engine is not None:
            await self.engine.shutdown()


def model_vocab_size(path: str | None) -> int:
    """The token ids a model folder's weights take: ``config.json``'s ``vocab_size`` (or its
    ``text_config``'s, for multimodal models), for engines that do not say (vLLM); 0 when
    unknown, and then ids are not checked against it (the engine's own checks remain)."""
    if not path:
        return 0
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    for section in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(section, dict):
            size = section.get("vocab_size")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                return size
    return 0
