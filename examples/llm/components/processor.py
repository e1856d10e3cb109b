"""Processor: chat template, tokenizer, detokenizer, stop strings (see dynamo_sdk.llm.processor).

It receives validated OpenAI requests from the Frontend and streams text deltas back, calling
a Worker with token ids. The context length it enforces is the smallest that live workers of
the model registered, so a request never reaches an engine that must reject it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dynamo_sdk import ServiceConfig, async_on_start, depends, dynamo_context, endpoint, service
from dynamo_sdk.llm.model_registry import ModelWatcher
from dynamo_sdk.llm.model_resolver import resolve_model
from dynamo_sdk.llm.processor import OpenAIProcessor
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest, ProcessorRequest, TextDelta
from dynamo_sdk.llm.tokenizer import Tokenizer
from dynamo_sdk.sdk.client import client_of
from examples.llm.components.kv_router import Router, RouteRequest
from examples.llm.components.worker import Worker


@service(dynamo={"namespace": "dynamo"})
class Processor:
    worker = depends(Worker)

    def __init__(self) -> None:
        self.config: dict[str, Any] = ServiceConfig.get_instance().for_service("Processor")
        self.logic: OpenAIProcessor | None = None
        self.models: ModelWatcher | None = None
        self.router: Any = None

    @async_on_start
    async def start(self) -> None:
        # Loading is blocking work (file I/O, imports): keep it off the event loop.
        path = await asyncio.to_thread(resolve_model, str(self.config.get("model", "auto")))
        served = str(self.config.get("served_model_name") or path)
        tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, path)
        fallback = int(self.config.get("context_length", _config_context(path)))
        self.logic = OpenAIProcessor(tokenizer, served, fallback)
        if self.config.get("use_router", False):
            # graphs/agg_router.py links Processor -> Router: ask it which worker, then go direct.
            self.router = client_of(dynamo_context.runtime, Router)  # type: ignore[arg-type]
        assert dynamo_context.runtime is not None
        self.models = ModelWatcher(dynamo_context.runtime)
        await self.models.wait_ready()

    @endpoint()
    async def generate(self, request: ProcessorRequest) -> AsyncIterator[TextDelta]:
        assert self.logic is not None and self.models is not None
        live = self.models.context_length(self.logic.model_name)
        if live is not None:
            self.logic.context_length = live
        engine_call = self._routed if self.router is not None else self.worker.generate
        async for delta in self.logic.generate(request, engine_call):
            yield delta

    async def _routed(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        decision = await self.router.route(RouteRequest(request.token_ids, request.request_id))
        stream = self.worker.generate.direct(decision.worker_id, request)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()
            with contextlib.suppress(Exception):  # the router also expires leaked assignments
                await self.router.release(request.request_id)


def _config_context(path: Path) -> int:
    """The model's own context length, for before any worker registered one."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        return int(config.get("max_position_embeddings", 2048))
    except (OSError, ValueError):
        return 2048
