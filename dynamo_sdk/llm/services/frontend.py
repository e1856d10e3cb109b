"""Frontend: the OpenAI-compatible HTTP server, and by default the whole request path.

It validates each request (`dynamo_sdk/llm/frontend.py`), tokenizes it with the chat template,
routes it (`router_mode`: round_robin, random, kv in this process, or service) and calls the
chosen Worker directly: one hop from HTTP to the engine (`dynamo_sdk/llm/serving.py`). With
`processor: true` it hands validated requests to the Processor service instead, for graphs
that scale preprocessing out. Models are those live workers announce in etcd.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta

from dynamo_sdk import (
    async_on_shutdown,
    async_on_start,
    depends,
    dynamo_context,
    endpoint,
    http_app,
    readiness,
    service,
    service_of,
)
from dynamo_sdk.llm.frontend import OpenAIServer
from dynamo_sdk.llm.model_registry import LiveModels
from dynamo_sdk.llm.routing import RouterState
from dynamo_sdk.llm.services.processor import Processor
from dynamo_sdk.llm.services.router import Router
from dynamo_sdk.llm.services.worker import Worker
from dynamo_sdk.llm.serving import PipelineConfig, ProcessorBackend, ServedModels


class FrontendConfig(PipelineConfig):
    """The Frontend's section: where it listens, and which request path it runs."""

    host: Annotated[str, Meta(description="the address to listen on")] = "0.0.0.0"
    port: Annotated[int, Meta(gt=0, lt=65536, description="the HTTP port")] = 8000
    processor: Annotated[bool, Meta(description="send requests through the Processor service")] = (
        False
    )
    startup_wait: Annotated[
        float, Meta(ge=0.0, description="seconds a request waits for a model still starting")
    ] = 60.0


def _folded(config: FrontendConfig) -> bool:
    return not config.processor


@service(dynamo={"namespace": "dynamo"}, config=FrontendConfig)
class Frontend:
    processor = depends(Processor, when=lambda c: c.processor)
    worker = depends(Worker, when=_folded)
    router = depends(Router, when=lambda c: _folded(c) and c.router_mode == "service")

    def __init__(self) -> None:
        self.config: FrontendConfig = service_of(Frontend).load_config()
        self.backend: ServedModels | ProcessorBackend | None = None

    @async_on_start
    async def start(self) -> None:
        runtime = dynamo_context.runtime
        assert runtime is not None
        if self.config.processor:
            through = runtime.watcher(
                service_of(Processor).namespace, service_of(Processor).name, "generate"
            )
            self.backend = ProcessorBackend(LiveModels(runtime, through), self.processor)
        else:
            router = self.router if self.config.router_mode == "service" else None
            self.backend = ServedModels(runtime, self.config, router)
        await self.backend.start()

    @http_app
    def app(self) -> Any:
        assert self.backend is not None
        return OpenAIServer(self.backend, startup_wait=self.config.startup_wait).app

    @endpoint()
    async def router_state(self, model: str) -> RouterState | None:
        """Its KV router's view of ``model``'s workers (with `router_mode: kv`)."""
        if isinstance(self.backend, ServedModels):
            return self.backend.router_state(model)
        return None

    @readiness
    def serving(self) -> str:
        """Ready once a model can be served end to end: "model dynamo-tiny, 1 worker"."""
        assert self.backend is not None
        return self.backend.summary()

    @async_on_shutdown
    async def stop(self) -> None:
        if self.backend is not None:
            await self.backend.stop()
