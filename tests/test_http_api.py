"""`@api` routes: GET and POST, streamed and single answers, clear errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from fastapi import FastAPI

from dynamo_sdk import api
from dynamo_sdk.runtime.errors import NoInstancesError
from dynamo_sdk.serve.api_routes import bind_api_methods


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


@pytest.mark.parametrize("before_first_chunk", [False, True])
async def test_stream_response_closes_the_body_when_the_client_leaves(
    before_first_chunk: bool,
) -> None:
    """A client gone mid-stream cancels the sender even while the body waits for its next item
    (or for its first one: a request still queued for its first token)."""
    import asyncio

    from dynamo_sdk.http.server import listen_socket, make_server
    from dynamo_sdk.http.streaming import StreamResponse
    from dynamo_sdk.serve.embedded import free_port

    closed = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            if before_first_chunk:
                await asyncio.Event().wait()
            yield b"first\n"
            await asyncio.Event().wait()  # a stalled upstream: nothing more ever comes
            yield b"never\n"
        finally:
            closed.set()

    app = FastAPI()
    app.add_api_route("/s", lambda: StreamResponse(body(), media_type="text/plain"))
    port = free_port()
    server = make_server(app, "127.0.0.1", port)
    task = asyncio.create_task(server.serve(sockets=[listen_socket("127.0.0.1", port)]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        while (b"\r\n\r\n" if before_first_chunk else b"first") not in received:
            received += await asyncio.wait_for(reader.read(4096), 5)
        assert not closed.is_set()
        writer.close()
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        server.should_exit = True
        await task
