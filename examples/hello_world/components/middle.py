"""The middle hop: calls Backend and decorates each word."""

from __future__ import annotations

from collections.abc import AsyncIterator

from components.backend import Backend
from components.protocol import Req
from dynamo_sdk import depends, endpoint, service


@service(dynamo={"namespace": "hello"})
class Middle:
    backend = depends(Backend)

    @endpoint()
    async def generate(self, req: Req) -> AsyncIterator[str]:
        async for part in self.backend.generate(Req(text=req.text + "-mid")):
            yield f"mid:{part}"
