"""`@api` routes: GET and POST, streamed and single answers, clear errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import msgspec
from fastapi import FastAPI

from dynamo_sdk import api
from dynamo_sdk.runtime.errors import NoInstancesError
from dynamo_sdk.serve.http import bind_api_methods


class Query(msgspec.Struct):
    name: str
    times: int = 1


class Service:
    @api(methods=["GET"])
    async def hello(self, q: Query) -> dict[str, str]:
        return {"greeting": " ".join([f"hi {q.name}"] * q.times)}

    @api(path="/words", stream_format="sse")
    async def words(self, q: Query) -> AsyncIterator[str]:
        for i in range(q.times):
            yield f"{q.name}{i}"

    @api()
    async def down(self, q: Query) -> AsyncIterator[str]:
        raise NoInstancesError("no live instance of x/y/z")
        yield ""  # pragma: no cover


def app() -> FastAPI:
    application = FastAPI()
    specs = [getattr(Service, n).__dynamo_api__ for n in ("hello", "words", "down")]
    bind_api_methods(application, Service(), specs)
    return application


async def test_get_and_post_routes() -> None:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/hello", params={"name": "ann", "times": "2"})
        assert r.status_code == 200 and r.json() == {"greeting": "hi ann hi ann"}
        r = await client.post("/words", json={"name": "w", "times": 3})
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text == 'data: "w0"\n\ndata: "w1"\n\ndata: "w2"\n\n'
        r = await client.get("/hello", params={"times": "2"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post("/down", json={"name": "x"})
        assert r.status_code == 503 and "no live instance" in r.json()["error"]["message"]
