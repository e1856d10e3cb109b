"""The last hop: turns text into words, one streamed item each."""

from __future__ import annotations

from collections.abc import AsyncIterator

from components.protocol import Req
from dynamo_sdk import ServiceConfig, async_on_start, dynamo_context, endpoint, liveness, service


@service(dynamo={"namespace": "hello"}, resources={"gpu": 0}, workers=2)
class Backend:
    def __init__(self) -> None:
        config = ServiceConfig.get_instance().get("Backend", {})
        self.suffix = str(config.get("suffix", "-back"))
        self.delay = float(config.get("delay", 0.0))

    @async_on_start
    async def warm(self) -> None:
        print(
            f"Backend worker {dynamo_context.worker_index} up, suffix={self.suffix!r}", flush=True
        )

    @liveness
    def alive(self) -> bool:
        return True

    @endpoint()
    async def generate(self, req: Req) -> AsyncIterator[str]:
        import asyncio

        for word in (req.text + self.suffix).split():
            if self.delay:
                await asyncio.sleep(self.delay)
            yield word
