"""Processor: preprocessing and routing as a service of its own (the scale-out request path).

By default the Frontend tokenizes, routes and calls the Worker itself. With `processor: true`
in the Frontend's section, it sends each validated request (a typed `ProcessorRequest`) here
instead, and this service does exactly what the Frontend would have done
(`dynamo_sdk/llm/serving.py`): chat template, tokenizer, context length, routing to a worker
(`router_mode`, `service` to ask the Router service), detokenization and stop strings.

It is ready (registered in discovery, so routed to) only once a model can be served end to end:
a Processor restarted while the graph runs must not take requests in the moment between its
start and its pipelines being built (each would fail with a 503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dynamo_sdk import (
    async_on_shutdown,
    async_on_start,
    depends,
    dynamo_context,
    endpoint,
    readiness,
    service,
    service_of,
)
from dynamo_sdk.llm.protocol import ProcessorRequest, TextDelta
from dynamo_sdk.llm.services.router import Router
from dynamo_sdk.llm.services.worker import Worker
from dynamo_sdk.llm.serving import PipelineConfig, ServedModels


class ProcessorConfig(PipelineConfig):
    """The Processor's section: its routing and fallback tokenizer."""


@service(dynamo={"namespace": "dynamo"}, config=ProcessorConfig)
class Processor:
    worker = depends(Worker)
    router = depends(Router, when=lambda c: c.router_mode == "service")

    def __init__(self) -> None:
        self.config: ProcessorConfig = service_of(Processor).load_config()
        self.models: ServedModels | None = None

    @async_on_start
    async def start(self) -> None:
        assert dynamo_context.runtime is not None
        router = self.router if self.config.router_mode == "service" else None
        self.models = ServedModels(dynamo_context.runtime, self.config, router)
        await self.models.start()

    @endpoint()
    async def generate(self, request: ProcessorRequest) -> AsyncIterator[TextDelta]:
        assert self.models is not None
        async for delta in self.models.generate(request.request_id, request.body):
            yield delta

    @readiness
    def serving(self) -> str:
        """Ready once a model's pipeline is built: "model dynamo-tiny, 2 workers"."""
        assert self.models is not None
        return self.models.summary()

    @async_on_shutdown
    async def stop(self) -> None:
        if self.models is not None:
            await self.models.stop()
