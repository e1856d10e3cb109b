"""The scale-out request path's calls between services, as the chaos suite found them.

`benchmarks/chaos_suite.py --scenario processor` (a Processor SIGKILLed under load) failed
new requests in two ways: the Frontend called Processors through NATS's queue group, which
also reaches a restarted Processor that subscribed but is not registered (not ready: no
pipeline yet, a 503 for each request), and a request whose Processor died before answering
failed (502) though nothing of it had reached the client. And with two Router services a
stream's `release` went to either Router, not to the one that routed it. Real NATS and etcd
(the session's servers); the services are plain endpoints.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from dynamo_sdk.llm.openai_protocol import CompletionRequest
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    PreprocessedRequest,
    ProcessorRequest,
    StopConditions,
    TextDelta,
)
from dynamo_sdk.llm.routing import RouteDecision, RouteRequest, ViaRouterService
from dynamo_sdk.llm.serving import ProcessorBackend
from dynamo_sdk.runtime.errors import StreamLostError
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.conftest import connected

BODY = CompletionRequest(model="m", prompt="hello", max_tokens=2)


async def test_a_processor_that_is_not_registered_gets_no_request(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """One Processor registered, another subscribed only (what a restarted one is until its
    readiness passes): every request goes to the registered one."""
    calls = {"ready": 0, "unready": 0}

    def processor(name: str) -> Any:
        async def generate(request: ProcessorRequest) -> AsyncIterator[TextDelta]:
            calls[name] += 1
            yield TextDelta(text=name, finish_reason="stop")

        return generate

    async with connected(servers, {}, {}, {}) as (ready, unready, frontend):
        await ready.serve_endpoint(unique_ns, "Processor", "generate", processor("ready"),
                                   request_type=ProcessorRequest)  # fmt: skip
        await unready.serve_endpoint(unique_ns, "Processor", "generate", processor("unready"),
                                     request_type=ProcessorRequest, register=False)  # fmt: skip
        client = frontend.endpoint_client(unique_ns, "Processor", "generate", TextDelta)
        assert await client.wait_for_instance_ids(5.0) == [ready.instance_id]
        backend = ProcessorBackend(None, SimpleNamespace(generate=client))  # type: ignore[arg-type]
        for i in range(20):
            assert [d.text async for d in backend.generate(f"r{i}", BODY)] == ["ready"]
    assert calls == {"ready": 20, "unready": 0}


class _Stream:
    """A ResponseStream stand-in: `deltas`, then `error` (if any)."""

    def __init__(self, deltas: list[TextDelta], error: BaseException | None) -> None:
        self.deltas, self.error, self.closed = deltas, error, False

    async def __aiter__(self) -> AsyncIterator[TextDelta]:
        for delta in self.deltas:
            yield delta
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


class _Processors:
    """The Processor client: each call answers with the next of `streams`."""

    def __init__(self, *streams: _Stream) -> None:
        self.streams = list(streams)
        self.generate = SimpleNamespace(round_robin=lambda _request: self.streams.pop(0))


async def test_a_request_whose_processor_died_before_answering_goes_to_another() -> None:
    lost = StreamLostError("dynamo/Processor/generate: the connection closed mid-stream")
    first, second = _Stream([], lost), _Stream([TextDelta(text="ok", finish_reason="stop")], None)
    backend = ProcessorBackend(None, _Processors(first, second))  # type: ignore[arg-type]
    assert [d.text async for d in backend.generate("r", BODY)] == ["ok"]
    assert backend.retried == 1 and first.closed and second.closed


async def test_a_stream_that_had_answered_is_not_sent_again() -> None:
    """Its Processor held the stream's state: another one would start the text over."""
    lost = StreamLostError("dynamo/Processor/generate: the connection closed mid-stream")
    cut = _Stream([TextDelta(text="half")], lost)
    backend = ProcessorBackend(None, _Processors(cut, _Stream([], None)))  # type: ignore[arg-type]
    got = []
    with pytest.raises(StreamLostError):
        async for delta in backend.generate("r", BODY):
            got.append(delta.text)
    assert got == ["half"] and backend.retried == 0


async def test_a_stream_is_released_at_the_router_that_routed_it(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """Two Router services: each stream's `release` reaches the Router whose `route` chose
    its worker (the other one holds no assignment for it)."""
    async with connected(servers, {}, {}, {}, {}) as (worker, r1, r2, caller):

        async def generate(request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
            yield EngineOutput(token_ids=[1], finish_reason="length")

        await worker.serve_endpoint(unique_ns, "Worker", "generate", generate,
                                    request_type=PreprocessedRequest)  # fmt: skip
        routed: dict[int, set[str]] = {r1.instance_id: set(), r2.instance_id: set()}
        released: dict[int, set[str]] = {r1.instance_id: set(), r2.instance_id: set()}

        def endpoints(me: int) -> tuple[Any, Any]:
            async def route(request: RouteRequest) -> RouteDecision:
                routed[me].add(request.request_id)
                return RouteDecision(worker.instance_id, 0, 1)

            async def release(request_id: str) -> bool:
                released[me].add(request_id)
                return True

            return route, release

        for rt in (r1, r2):
            on_route, on_release = endpoints(rt.instance_id)
            await rt.serve_endpoint(unique_ns, "Router", "route", on_route,
                                    request_type=RouteRequest, streaming=False)  # fmt: skip
            await rt.serve_endpoint(unique_ns, "Router", "release", on_release,
                                    request_type=str, streaming=False)  # fmt: skip
        router = SimpleNamespace(
            route=caller.endpoint_client(unique_ns, "Router", "route", RouteDecision),
            release=caller.endpoint_client(unique_ns, "Router", "release", bool),
        )
        for client in (router.route, router.release):
            for _ in range(100):
                if len(client.instance_ids()) == 2:
                    break
                await asyncio.sleep(0.05)
        workers = caller.endpoint_client(unique_ns, "Worker", "generate", EngineOutput)
        await workers.wait_for_instance_ids(5.0)
        routing = ViaRouterService(workers, router)
        for i in range(12):
            request = PreprocessedRequest(f"r{i}", "m", [1, 2, 3], StopConditions(max_tokens=1))
            assert [o.token_ids async for o in routing.stream(request)] == [[1]]
    assert all(routed.values()), "round robin over both Routers"
    assert released == routed
