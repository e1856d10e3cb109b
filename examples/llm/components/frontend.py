"""Frontend: the OpenAI-compatible HTTP server (see dynamo_sdk.llm.frontend).

Lists the models live workers registered in etcd and forwards each request to a Processor.
The HTTP port is `port` in its YAML section (default 8000).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dynamo_sdk import (
    ServiceConfig,
    async_on_start,
    depends,
    dynamo_context,
    http_app,
    readiness,
    service,
)
from dynamo_sdk.llm.frontend import OpenAIServer
from dynamo_sdk.llm.model_registry import ModelWatcher
from dynamo_sdk.llm.protocol import ProcessorRequest, TextDelta
from examples.llm.components.processor import Processor


class _GraphBackend:
    """Models from etcd, generation through the Processor service."""

    def __init__(self, models: ModelWatcher, processor: Any) -> None:
        self.models = models
        self.processor = processor

    def model_names(self) -> list[str]:
        return self.models.model_names()

    def generate(self, request: ProcessorRequest) -> AsyncIterator[TextDelta]:
        return self.processor.generate(request)  # type: ignore[no-any-return]


@service(dynamo={"namespace": "dynamo"})
class Frontend:
    processor = depends(Processor)

    def __init__(self) -> None:
        self.config: dict[str, Any] = ServiceConfig.get_instance().for_service("Frontend")
        self.models: ModelWatcher | None = None

    @async_on_start
    async def start(self) -> None:
        assert dynamo_context.runtime is not None
        self.models = ModelWatcher(dynamo_context.runtime)
        await self.models.wait_ready()

    @http_app
    def app(self) -> Any:
        assert self.models is not None
        return OpenAIServer(_GraphBackend(self.models, self.processor)).app

    @readiness
    def serving(self) -> str:
        """Ready once a model is listed: e.g. "model dynamo-tiny, 1 worker"."""
        assert self.models is not None
        return self.models.summary()
