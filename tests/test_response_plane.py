"""The TCP response plane: framing, the NATS fallback, the opt-out, and uvloop, on real servers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from dynamo_sdk.runtime import DistributedRuntime, RuntimeSettings
from dynamo_sdk.runtime.response_plane import _FrameReader, encode_message, listen_host
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.conftest import settings_for


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None


def test_frames_survive_any_split_of_the_byte_stream() -> None:
    sent = [(f"_INBOX.abc.{i:x}", bytes([i % 256]) * (i * 37 % 500)) for i in range(200)]
    wire = b"".join(encode_message(reply, frame) for reply, frame in sent)
    rng = random.Random(0)
    for _ in range(20):
        got: list[tuple[str, bytes]] = []
        reader = _FrameReader(lambda reply, frame, got=got: got.append((reply, frame)))
        reader.connection_made(_Transport())  # type: ignore[arg-type]
        i = 0
        while i < len(wire):
            step = rng.choice((1, 2, 5, 6, 7, 100, 4096))
            reader.data_received(wire[i : i + step])
            i += step
        assert got == sent


def test_a_corrupt_header_closes_the_connection() -> None:
    got: list[tuple[str, bytes]] = []
    reader = _FrameReader(lambda reply, frame: got.append((reply, frame)))
    transport = _Transport()
    reader.connection_made(transport)  # type: ignore[arg-type]
    reader.data_received(b"\xff\xff\xff\xff\x01\x00" + b"x" * 10)  # 4 GiB message
    assert transport.closed and got == []


def test_listen_host() -> None:
    assert listen_host("nats://127.0.0.1:4222") == "127.0.0.1"
    assert listen_host("nats://localhost:4222,nats://10.0.0.9:4222") == "127.0.0.1"
    assert listen_host("127.0.0.2:4222") == "127.0.0.2"


def test_response_transport_must_be_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_RESPONSE_TRANSPORT", "udp")
    with pytest.raises(ValueError, match="DYN_RESPONSE_TRANSPORT"):
        RuntimeSettings.from_env()
    monkeypatch.setenv("DYN_RESPONSE_TRANSPORT", "NATS")
    assert RuntimeSettings.from_env().response_transport == "nats"


async def _count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i
        if i % 100 == 0:
            await asyncio.sleep(0)


async def test_responses_come_over_tcp(servers: EmbeddedServers, unique_ns: str) -> None:
    callee = await DistributedRuntime.connect(settings_for(servers))
    caller = await DistributedRuntime.connect(settings_for(servers))
    try:
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        assert caller.dispatcher.reply_addr.startswith("127.0.0.1:")
        assert [i async for i in client(5000)] == list(range(5000))
        assert callee.replies.ready(caller.dispatcher.reply_addr) is not None
    finally:
        await caller.shutdown()
        await callee.shutdown()


async def test_an_unreachable_caller_is_answered_over_nats(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    callee = await DistributedRuntime.connect(settings_for(servers))
    caller = await DistributedRuntime.connect(settings_for(servers))
    try:
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        # Name an address nothing listens on (as a caller behind NAT would).
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = f"127.0.0.1:{probe.sockets[0].getsockname()[1]}"
        probe.close()
        await probe.wait_closed()
        caller.dispatcher.reply_addr = dead
        assert [i async for i in client(300)] == list(range(300))
        assert callee.replies.ready(dead) is None and dead in callee.replies._refused
        assert [i async for i in client(3)] == [0, 1, 2]  # no second attempt for a while
    finally:
        await caller.shutdown()
        await callee.shutdown()


async def test_nats_only_when_configured(servers: EmbeddedServers, unique_ns: str) -> None:
    callee = await DistributedRuntime.connect(settings_for(servers))
    caller = await DistributedRuntime.connect(settings_for(servers, response_transport="nats"))
    try:
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        assert caller.dispatcher.reply_addr == ""
        assert [i async for i in client(1000)] == list(range(1000))
        assert not callee.replies._conns
    finally:
        await caller.shutdown()
        await callee.shutdown()


def test_streams_under_uvloop(servers: EmbeddedServers) -> None:
    """Workers run on uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def main() -> list[int]:
        callee = await DistributedRuntime.connect(settings_for(servers))
        caller = await DistributedRuntime.connect(settings_for(servers))
        try:
            await callee.serve_endpoint("uvloop-test", "Count", "count", _count, request_type=int)
            client = caller.endpoint_client("uvloop-test", "Count", "count", response_type=int)
            got = [i async for i in client(2000)]
            assert callee.replies.ready(caller.dispatcher.reply_addr) is not None
            return got
        finally:
            await caller.shutdown()
            await callee.shutdown()

    assert uvloop.run(main()) == list(range(2000))
