"""How the Frontend (and a Processor service) serve the live models: one pipeline per model.

A `ModelPipeline` is all one model needs between the HTTP edge and its workers: the tokenizer
(of the folder the workers announced, loaded once and off the event loop), the pre- and
post-processing (`processor.py`) and the routing to a worker instance (`routing.py`).
`ServedModels` keeps one per live model, built as soon as the model appears (the first request
does not pay for loading a tokenizer), and is the backend the OpenAI edge serves: HTTP,
preprocessing and routing in one process, one hop from there to the engine.
`ProcessorBackend` is the scale-out alternative: requests go to a Processor service, which
runs `ServedModels` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from msgspec import Meta

from dynamo_sdk.llm.errors import ServiceUnavailableError
from dynamo_sdk.llm.migration import Migrating, worker_failed
from dynamo_sdk.llm.model_registry import LiveModels
from dynamo_sdk.llm.model_resolver import resolve_model
from dynamo_sdk.llm.openai_protocol import OpenAIRequest
from dynamo_sdk.llm.processor import OpenAIProcessor
from dynamo_sdk.llm.protocol import ModelEntry, ProcessorRequest, TextDelta
from dynamo_sdk.llm.routing import (
    KvAware,
    RouterState,
    Routing,
    RoutingConfig,
    routing_for,
    state_of,
)
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.runtime import DistributedRuntime

log = logging.getLogger("dynamo.llm.serving")

RETRY_S = 30.0  # seconds before a model whose pipeline failed to build is tried again


class PipelineConfig(RoutingConfig):
    """What preprocessing and routing need besides what workers announce."""

    model: Annotated[
        str, Meta(description="the tokenizer for workers that announce no model (echo)")
    ] = "auto"


class ModelPipeline:
    """One model: preprocessing, the routed call to a worker (migrated to another when that
    worker dies: `migration.py`), postprocessing."""

    def __init__(
        self, entry: ModelEntry, tokenizer: Tokenizer, routing: Routing, migration_limit: int = 3
    ) -> None:
        self.entry = entry
        self.processor = OpenAIProcessor(tokenizer, entry.name)
        self.routing = routing
        self.call = Migrating(routing.stream, migration_limit)

    def generate(
        self, request_id: str, body: OpenAIRequest, context_length: int
    ) -> AsyncIterator[TextDelta]:
        return self.processor.generate(request_id, body, self.call, context_length)


class ServedModels:
    """Every live model's pipeline, kept in step with etcd (see module docstring).

    ``router_service``: the Router service's client, for `router_mode: service`.
    """

    def __init__(
        self,
        runtime: DistributedRuntime,
        config: PipelineConfig,
        router_service: Any = None,
        models: LiveModels | None = None,
    ) -> None:
        self.runtime = runtime
        self.models = models or LiveModels(runtime)
        self.routing = config
        self.fallback_model = config.model
        self.router_service = router_service
        self.pipelines: dict[str, ModelPipeline] = {}
        self._tokenizers: dict[str, Tokenizer] = {}
        # model -> why its pipeline could not be built, and when (retried after RETRY_S: a
        # worker restarted with a fixed folder, a file system that came back)
        self._failed: dict[str, tuple[str, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self.models.wait_ready()
        self._task = asyncio.create_task(self._keep_up())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for pipeline in self.pipelines.values():
            await pipeline.routing.stop()

    # ---- the backend the OpenAI edge serves ---------------------------------------------

    def model_names(self) -> list[str]:
        return [name for name in self.models.names() if name in self.pipelines]

    async def wait_for_model(self, name: str, timeout: float) -> bool:
        """Live with its pipeline built, now or within ``timeout`` (a start-up gap)."""
        deadline = asyncio.get_running_loop().time() + timeout
        if not await self.models.wait_for(name, timeout):
            return False
        while name not in self.pipelines and name not in self._failed:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return name in self.pipelines

    def summary(self) -> str:
        return self.models.summary() if self.model_names() else ""

    def unavailable(self) -> str:
        """Why nothing can be served now, or "" (the Frontend's /health)."""
        return _transport_problem(self.runtime)

    def router_state(self, model: str) -> RouterState | None:
        """The KV router's view of ``model``'s workers (None unless routed by KV here)."""
        pipeline = self.pipelines.get(model)
        if pipeline is None or not isinstance(pipeline.routing, KvAware):
            return None
        return state_of(pipeline.routing.router)

    def generate(self, request_id: str, body: OpenAIRequest) -> AsyncIterator[TextDelta]:
        pipeline = self.pipelines.get(body.model)
        context = self.models.context_length(body.model)
        if pipeline is None or context is None:
            why = self._failed.get(body.model, ("no live worker", 0.0))[0]
            raise ServiceUnavailableError(f"model {body.model!r} cannot be served now: {why}")
        return pipeline.generate(request_id, body, context)

    # ---- building pipelines as models appear --------------------------------------------

    async def _keep_up(self) -> None:
        while True:
            now = time.monotonic()
            for entry in self._first_entries():
                failed = self._failed.get(entry.name)
                if entry.name not in self.pipelines and (
                    failed is None or now - failed[1] > RETRY_S
                ):
                    await self._build(entry)
            with contextlib.suppress(TimeoutError):
                await self.models.wait_for_change(0.25)

    def _first_entries(self) -> list[ModelEntry]:
        first: dict[str, ModelEntry] = {}
        for entry in self.models.announced():
            first.setdefault(entry.name, entry)
        return list(first.values())

    async def _build(self, entry: ModelEntry) -> None:
        try:
            tokenizer = await self._tokenizer(entry.path or "")
            routing = await routing_for(self.runtime, entry, self.routing, self.router_service)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            self._failed[entry.name] = (why, time.monotonic())
            log.error("cannot serve model %s: %s (retrying in %.0f s)", entry.name, why, RETRY_S)
            return
        self._failed.pop(entry.name, None)
        self.pipelines[entry.name] = ModelPipeline(
            entry, tokenizer, routing, self.routing.migration_limit
        )
        log.info("serving model %s (%s routing, tokenizer %s)", entry.name,
                 self.routing.router_mode, tokenizer.path)  # fmt: skip

    async def _tokenizer(self, path: str) -> Tokenizer:
        folder = path or str(await asyncio.to_thread(resolve_model, self.fallback_model))
        tokenizer = self._tokenizers.get(folder)
        if tokenizer is None:
            tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, folder)
            self._tokenizers[folder] = tokenizer
        return tokenizer


def _transport_problem(runtime: DistributedRuntime) -> str:
    """Requests travel over NATS: without a connection nothing is served."""
    return "" if runtime.nc.is_connected else "NATS is disconnected (reconnecting)"


class ProcessorBackend:
    """Requests go to a Processor service; models are live while a Processor is.

    Processors are picked round robin among the registered (ready) ones: NATS's queue group
    would also reach one that was restarted and subscribed but has no pipeline yet (a 503 for
    each request it gets then), and one this process saw fail. A request whose Processor
    fails (dies, goes silent, drains) before its first answer is sent to another one, up to
    ``retries`` times: nothing of it reached the client yet. A stream that had answered is
    cut: its Processor held its state (the detokenizer's, the stop strings'), which no other
    one can take over.
    """

    def __init__(self, models: LiveModels, processor: Any, retries: int = 3) -> None:
        self.models = models
        self.processor = processor  # the Processor service's client
        self.retries = retries
        self.retried = 0  # requests sent to another Processor (tests, logs)

    async def start(self) -> None:
        await self.models.wait_ready()

    async def stop(self) -> None:
        """Nothing runs here."""

    def model_names(self) -> list[str]:
        return self.models.names()

    async def wait_for_model(self, name: str, timeout: float) -> bool:
        return await self.models.wait_for(name, timeout)

    def summary(self) -> str:
        return self.models.summary()

    def unavailable(self) -> str:
        """Why nothing can be served now, or "" (the Frontend's /health)."""
        return _transport_problem(self.models.runtime)

    async def generate(self, request_id: str, body: OpenAIRequest) -> AsyncIterator[TextDelta]:
        request = ProcessorRequest.of(request_id, body)
        attempt = 0
        while True:
            stream = self.processor.generate.round_robin(request)
            answered = False
            try:
                async for delta in stream:
                    answered = True
                    yield delta
                return
            except Exception as exc:
                if answered or attempt >= self.retries or not worker_failed(exc):
                    raise
                attempt += 1
                self.retried += 1
                log.warning("request %s: %s; sending it to another Processor (retry %d of %d)",
                            request_id, exc, attempt, self.retries)  # fmt: skip
                await asyncio.sleep(min(0.05 * 2 ** (attempt - 1), 1.0))
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()
