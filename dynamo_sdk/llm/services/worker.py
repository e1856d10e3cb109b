"""Worker: one engine behind the engine contract (token ids in, token id deltas out).

The engine is chosen in YAML (`engine: torch | vllm | mocker | echo`); the rest of the section
is the worker's own keys and the engine's knobs (`dynamo_sdk/llm/worker/config.py`). All the
logic is `LLMWorker`'s (`dynamo_sdk/llm/worker/worker.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dynamo_sdk import (
    async_on_shutdown,
    async_on_start,
    dynamo_context,
    endpoint,
    liveness,
    service,
    service_of,
)
from dynamo_sdk.llm.engines.base import EngineStats
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_sdk.llm.worker.config import WorkerConfig, for_service, worker_config
from dynamo_sdk.llm.worker.worker import LLMWorker


@service(
    dynamo={"namespace": "dynamo"},
    resources={"gpu": 1},
    workers=1,
    config=for_service(worker_config, "Worker"),
)
class Worker:
    def __init__(self) -> None:
        config: WorkerConfig = service_of(Worker).load_config()
        self.llm = LLMWorker(config)

    @async_on_start
    async def start(self) -> None:
        assert dynamo_context.runtime is not None
        await self.llm.start(
            dynamo_context.runtime,
            service_of(Worker).namespace,
            service_of(Worker).name,
            "generate",
        )

    @endpoint()
    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        async for output in self.llm.generate(request):
            yield output

    @endpoint()
    async def stats(self, _: str) -> EngineStats:
        return self.llm.stats()

    @endpoint()
    async def disagg_stats(self, _: str) -> dict[str, int]:
        """Conditional-disaggregation decisions and transfers so far."""
        return self.llm.disagg_stats()

    @liveness
    def alive(self) -> bool:
        """False once the engine failed for good: the supervisor then restarts this worker."""
        return self.llm.alive()

    @async_on_shutdown
    async def stop(self) -> None:
        await self.llm.stop()
