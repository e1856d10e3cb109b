"""Frontend: the OpenAI-compatible HTTP server (see dynamo_sdk.llm.frontend).

Lists the models live workers registered in etcd and forwards each request to a Processor.
The HTTP port is `port` in its YAML section (default 8000).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from dynamo_sdk import (
    ServiceConfig,
    async_on_shutdown,
    async_on_start,
    depends,
    dynamo_context,
    service,
)
from dynamo_sdk.http.server import listen_socket, make_server
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
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    @async_on_start
    async def start(self) -> None:
        assert dynamo_context.runtime is not None
        models = ModelWatcher(dynamo_context.runtime)
        await models.wait_ready()
        app = OpenAIServer(_GraphBackend(models, self.processor)).app
        host = str(self.config.get("host", "0.0.0.0"))
        sock = listen_socket(host, int(self.config.get("port", 8000)))
        self._server = make_server(app, host, sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    @async_on_shutdown
    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 10)
