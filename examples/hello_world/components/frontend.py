"""The entry: an HTTP route (POST /generate) streaming what Middle streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

from components.middle import Middle
from components.protocol import Req
from dynamo_sdk import api, depends, service


@service(dynamo={"namespace": "hello"})
class Frontend:
    middle = depends(Middle)

    @api()
    async def generate(self, req: Req) -> AsyncIterator[str]:
        async for part in self.middle.generate(req):
            yield part
