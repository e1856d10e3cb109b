"""PrefillWorker: computes prompts' KV for decode workers (disaggregated serving).

It serves the namespace's prefill queue with its own engine and delivers each prompt's KV to
the decode worker that queued it; the logic is `LLMPrefillWorker`'s
(`dynamo_sdk/llm/worker/prefill.py`), how the KV moves is the engine family's transport.
"""

from __future__ import annotations

from dynamo_sdk import (
    async_on_shutdown,
    async_on_start,
    dynamo_context,
    endpoint,
    service,
    service_of,
)
from dynamo_sdk.llm.worker.config import PrefillConfig, for_service, prefill_config
from dynamo_sdk.llm.worker.prefill import LLMPrefillWorker


# peer_gpus: it also sees the decode workers' GPUs (after its own), so it can write KV
# straight into their caches through CUDA IPC; pinned to its GPU alone it would fall back to TCP.
@service(
    dynamo={"namespace": "dynamo"},
    resources={"gpu": 1},
    workers=1,
    peer_gpus=True,
    config=for_service(prefill_config, "PrefillWorker"),
)
class PrefillWorker:
    def __init__(self) -> None:
        config: PrefillConfig = service_of(PrefillWorker).load_config()
        self.llm = LLMPrefillWorker(config)

    @async_on_start
    async def start(self) -> None:
        assert dynamo_context.runtime is not None
        await self.llm.start(dynamo_context.runtime, service_of(PrefillWorker).namespace)
        dynamo_context.shutdown_reserve = self.llm.shutdown_reserve()

    @endpoint()
    async def stats(self, _: str) -> dict[str, int]:
        return self.llm.stats()

    @async_on_shutdown
    async def stop(self) -> None:
        await self.llm.stop()
