"""The TCP response plane: framing, the NATS fallback, the opt-out, and uvloop, on real servers."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

from dynamo_sdk.runtime import (
    DistributedRuntime,
    RemoteError,
    RuntimeSettings,
    StreamLostError,
)
from dynamo_sdk.runtime.discovery import responder_key
from dynamo_sdk.runtime.response_plane import (
    _HELLO,
    _FrameReader,
    _mac,
    encode_message,
    listen_host,
)
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.conftest import child_env, connected, knowing_each_other, settings_for


class _Transport:
    def __init__(self) -> None:
        self.closed = False
        self.written = bytearray()

    def close(self) -> None:
        self.closed = True

    abort = close

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str) -> None:
        return None


def test_frames_survive_any_split_of_the_byte_stream() -> None:
    sent = [(f"_INBOX.abc.{i:x}", bytes([i % 256]) * (i * 37 % 500)) for i in range(200)]
    wire = b"".join(encode_message(reply, frame) for reply, frame in sent)
    rng = random.Random(0)
    for _ in range(20):
        got: list[tuple[str, bytes]] = []
        reader = _FrameReader(lambda reply, frame, conn, got=got: got.append((reply, frame)))
        reader.connection_made(_Transport())  # type: ignore[arg-type]
        i = 0
        while i < len(wire):
            step = rng.choice((1, 2, 5, 6, 7, 100, 4096))
            reader.data_received(wire[i : i + step])
            i += step
        assert got == sent


def test_a_corrupt_header_closes_the_connection() -> None:
    got: list[tuple[str, bytes]] = []
    reader = _FrameReader(lambda reply, frame, conn: got.append((reply, frame)))
    transport = _Transport()
    reader.connection_made(transport)  # type: ignore[arg-type]
    reader.data_received(b"\xff\xff\xff\xff\x01\x00" + b"x" * 10)  # 4 GiB message
    assert transport.closed and got == []


SECRET = "a-graph-secret-of-enough-length"


def test_a_listener_with_a_secret_reads_no_frame_before_the_peer_proves_it() -> None:
    """Forged frames from a peer that skips the handshake (or fakes it) are never delivered."""
    for proof in (b"", b"\0" * 48, bytes(16) + _mac(b"another graph's secret", b"", b"", b"")):
        got: list[tuple[str, bytes]] = []
        reader = _FrameReader(lambda r, f, c, got=got: got.append((r, f)), secret=SECRET.encode())
        transport = _Transport()
        reader.connection_made(transport)  # type: ignore[arg-type]
        assert transport.written[:4] == b"DYRP" and transport.written[5] == 1  # auth required
        reader.data_received(proof + encode_message("_INBOX.x.1", b"forged") * 8)
        assert got == [] and transport.closed


def test_a_listener_delivers_frames_once_the_peer_proved_the_secret() -> None:
    got: list[tuple[str, bytes]] = []
    reader = _FrameReader(lambda r, f, c: got.append((r, f)), secret=SECRET.encode())
    transport = _Transport()
    reader.connection_made(transport)  # type: ignore[arg-type]
    _, _, _, nonce = _HELLO.unpack(bytes(transport.written))
    mine = bytes(range(16))
    proof = mine + _mac(SECRET.encode(), b"callee", nonce, mine)
    reader.data_received(proof + encode_message("_INBOX.x.1", b"real"))
    assert got == [("_INBOX.x.1", b"real")] and not transport.closed
    # ... and it proved itself back: the callee can check the listener is the graph's too
    assert transport.written[_HELLO.size :] == _mac(SECRET.encode(), b"caller", mine, nonce)


def test_graph_secret_must_be_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_GRAPH_SECRET", "short")
    with pytest.raises(ValueError, match="DYN_GRAPH_SECRET must be at least 16"):
        RuntimeSettings.from_env()
    monkeypatch.setenv("DYN_GRAPH_SECRET", SECRET)
    assert RuntimeSettings.from_env().graph_secret == SECRET
    assert SECRET not in repr(RuntimeSettings.from_env())


def test_dynamo_serve_hands_its_processes_a_generated_secret() -> None:
    from dynamo_sdk.serve.run import with_graph_secret

    env = with_graph_secret({"NATS_SERVER": "n"}, joining=False, environ={})
    assert len(env["DYN_GRAPH_SECRET"]) >= 32 and env["NATS_SERVER"] == "n"
    again = with_graph_secret({"NATS_SERVER": "n"}, joining=False, environ={})
    assert again["DYN_GRAPH_SECRET"] != env["DYN_GRAPH_SECRET"]
    given = with_graph_secret({}, joining=True, environ={"DYN_GRAPH_SECRET": SECRET})
    assert "DYN_GRAPH_SECRET" not in given  # inherited from the environment as it is


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
    async with connected(servers, {}, {}) as (callee, caller):
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        assert caller.dispatcher.reply_addr.startswith("127.0.0.1:")
        assert [i async for i in client(5000)] == list(range(5000))
        assert callee.replies.ready(caller.dispatcher.reply_addr) is not None


async def test_an_unreachable_caller_is_answered_over_nats(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    async with connected(servers, {}, {}) as (callee, caller):
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        # Name an address nothing listens on (as a caller behind NAT would).
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = f"127.0.0.1:{probe.sockets[0].getsockname()[1]}"
        probe.close()
        await probe.wait_closed()
        await listening_at(caller, dead, callee)
        assert [i async for i in client(300)] == list(range(300))
        assert callee.replies.ready(dead) is None and dead in callee.replies._refused
        assert [i async for i in client(3)] == [0, 1, 2]  # no second attempt for a while


async def listening_at(
    caller: DistributedRuntime, address: str, *callees: DistributedRuntime
) -> None:
    """Make ``caller`` name ``address`` as its response listener, registered as its own (as
    a caller behind NAT, or a stalled one, would be), once ``callees`` have seen it."""
    caller.dispatcher.reply_addr = address
    await caller.put_leased(responder_key(caller.instance_id), address.encode())
    await knowing_each_other([*callees, caller])


async def test_a_callee_connects_only_to_registered_callers(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """A request naming an address no caller registered (anyone on NATS could send one) is
    answered over NATS: the callee never opens a connection to it."""
    dialed: list[object] = []
    trap = await asyncio.start_server(lambda r, w: dialed.append(w), "127.0.0.1", 0)
    try:
        async with connected(servers, {}, {}) as (callee, caller):
            await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
            client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
            elsewhere = f"127.0.0.1:{trap.sockets[0].getsockname()[1]}"
            caller.dispatcher.reply_addr = elsewhere
            assert [i async for i in client(50)] == list(range(50))
            await asyncio.sleep(0.2)
            assert dialed == [] and callee.replies.ready(elsewhere) is None
    finally:
        trap.close()
        await trap.wait_closed()


async def test_peers_with_the_graph_secret_stream_over_tcp(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    secret = {"graph_secret": SECRET}
    async with connected(servers, secret, secret) as (callee, caller):
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        assert [i async for i in client(2000)] == list(range(2000))
        assert callee.replies.ready(caller.dispatcher.reply_addr) is not None


@pytest.mark.parametrize(
    "callee_secret, caller_secret",
    [("", SECRET), (SECRET, ""), (SECRET, "another-graph-secret-entirely")],
    ids=["callee-without", "caller-without", "different"],
)
async def test_peers_that_do_not_share_the_secret_answer_over_nats(
    servers: EmbeddedServers, unique_ns: str, callee_secret: str, caller_secret: str
) -> None:
    """No stream travels over a connection either side could not authenticate; the call
    still succeeds, over NATS, and the callee does not retry TCP for a while."""
    async with connected(
        servers, {"graph_secret": callee_secret}, {"graph_secret": caller_secret}
    ) as (callee, caller):
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        assert [i async for i in client(300)] == list(range(300))
        address = caller.dispatcher.reply_addr
        assert callee.replies.ready(address) is None and callee.replies.refused(address)


async def test_forged_frames_on_a_callers_listener_never_reach_its_streams(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """An attacker who knows a live call's reply subject connects to the caller's listener and
    writes frames for it: the listener cuts it off before reading one, and the real stream
    completes with the callee's items only."""
    release = asyncio.Event()

    async def slow(n: int) -> AsyncIterator[int]:
        await release.wait()
        for i in range(n):
            yield i

    secret = {"graph_secret": SECRET}
    async with connected(servers, secret, secret) as (callee, caller):
        await callee.serve_endpoint(unique_ns, "Slow", "gen", slow, request_type=int)
        client = caller.endpoint_client(unique_ns, "Slow", "gen", response_type=int)
        stream = client(5)
        task = asyncio.ensure_future(_collect(stream))
        await asyncio.sleep(0.2)
        (token,) = list(caller.dispatcher._streams)
        reply = f"{caller.dispatcher._prefix}.{token}"
        from dynamo_sdk.runtime.protocol import FrameKind, ResponseFrame

        forged = msgspec.msgpack.encode(
            ResponseFrame(FrameKind.END, 0, [msgspec.Raw(msgspec.msgpack.encode(666))])
        )
        host, _, port = caller.dispatcher.reply_addr.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        hello = await reader.readexactly(_HELLO.size)
        assert hello[5] == 1  # the listener asks for proof
        writer.write(bytes(48) + encode_message(reply, forged))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # cut off
        writer.close()
        release.set()
        assert await asyncio.wait_for(task, 10) == [0, 1, 2, 3, 4]


async def _collect(stream: AsyncIterator[int]) -> list[int]:
    return [i async for i in stream]


async def test_nats_only_when_configured(servers: EmbeddedServers, unique_ns: str) -> None:
    async with connected(servers, {}, {"response_transport": "nats"}) as (callee, caller):
        await callee.serve_endpoint(unique_ns, "Count", "count", _count, request_type=int)
        client = caller.endpoint_client(unique_ns, "Count", "count", response_type=int)
        assert caller.dispatcher.reply_addr == ""
        assert [i async for i in client(1000)] == list(range(1000))
        assert not callee.replies._conns


def test_streams_under_uvloop(servers: EmbeddedServers) -> None:
    """Workers run on uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def main() -> list[int]:
        async with connected(servers, {}, {}) as (callee, caller):
            await callee.serve_endpoint("uvloop-test", "Count", "count", _count, request_type=int)
            client = caller.endpoint_client("uvloop-test", "Count", "count", response_type=int)
            got = [i async for i in client(2000)]
            assert callee.replies.ready(caller.dispatcher.reply_addr) is not None
            return got

    assert uvloop.run(main()) == list(range(2000))


def test_frames_for_another_process_are_dropped() -> None:
    from dynamo_sdk.runtime.client import CallDispatcher

    dispatcher = CallDispatcher(None, 5.0)  # type: ignore[arg-type]
    got: list[bytes] = []

    class Stream:
        def _on_frame(self, frame: bytes) -> None:
            got.append(frame)

    stream = Stream()
    token, reply = dispatcher.new_call()
    dispatcher.register(token, stream)  # type: ignore[arg-type]
    dispatcher._deliver("_INBOX.someoneelse." + token, b"theirs")
    dispatcher._deliver(reply, b"ours")
    assert got == [b"ours"]


@pytest.fixture
def stalled_listener() -> Iterator[str]:
    """An address whose accept queue is full: connecting to it just waits (as through a
    firewall that drops packets)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    for c in fillers:
        c.close()
    server.close()


async def _one(n: int) -> AsyncIterator[int]:
    yield n


async def test_a_cancelled_stream_does_not_strand_others_waiting_for_the_connection(
    servers: EmbeddedServers, unique_ns: str, stalled_listener: str
) -> None:
    async with connected(servers, {}, {}) as (callee, caller):
        await callee.serve_endpoint(unique_ns, "One", "one", _one, request_type=int)
        client = caller.endpoint_client(unique_ns, "One", "one", response_type=int)
        await listening_at(caller, stalled_listener, callee)
        first = asyncio.create_task(anext(aiter(client(1))))
        await asyncio.sleep(0.05)  # its request reaches the callee, which starts connecting
        second = asyncio.create_task(client(2)._single())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(first, 0.3)  # the first caller gives up meanwhile
        # The connection attempt times out and the second stream is answered over NATS.
        assert await asyncio.wait_for(second, 4.0) == 2


async def _flood(n: int) -> AsyncIterator[bytes]:
    while True:
        yield b"x" * 65536
        await asyncio.sleep(0.001)


async def _quiet(n: int) -> AsyncIterator[int]:
    await asyncio.sleep(n)  # a long prefill: only heartbeats keep the caller's watchdog fed
    yield n


async def test_a_caller_that_stops_reading_holds_up_nobody_else(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    fast = {"heartbeat_interval": 0.3, "stream_timeout": 1.5}

    held: list[asyncio.BaseTransport] = []  # a transport that does not read is not polled:
    # only this reference keeps it from being collected (and its socket closed)

    class Sink(asyncio.Protocol):  # says hello as a listener does, then never reads
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.write(_HELLO.pack(b"DYRP", 1, 0, bytes(16)))
            transport.pause_reading()
            held.append(transport)

    sink = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0)
    try:
        async with connected(servers, fast, fast, fast) as (callee, stuck, other):
            await callee.serve_endpoint(unique_ns, "F", "flood", _flood, request_type=int)
            await callee.serve_endpoint(unique_ns, "Q", "quiet", _quiet, request_type=int)
            await listening_at(stuck, f"127.0.0.1:{sink.sockets[0].getsockname()[1]}", callee)
            flood = stuck.endpoint_client(unique_ns, "F", "flood", response_type=bytes)(0)
            pending = asyncio.create_task(anext(aiter(flood)))
            await asyncio.sleep(1.0)  # the flood fills the socket buffers; the connection pauses
            conn = callee.replies.ready(stuck.dispatcher.reply_addr)
            assert conn is not None and not conn.writable and not conn.lost
            # Heartbeats still reach another caller's quiet stream, and draining is bounded.
            quiet = other.endpoint_client(unique_ns, "Q", "quiet", response_type=int)
            assert [i async for i in quiet(2)] == [2]
            started = time.monotonic()
            assert await callee.drain(0.5) == 1
            assert time.monotonic() - started < 8.0
            pending.cancel()
    finally:
        for transport in held:
            transport.close()
        sink.close()
        await sink.wait_closed()


async def test_oversized_items_fail_their_stream_and_big_bursts_are_split(
    servers: EmbeddedServers, unique_ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynamo_sdk.runtime.server as server_module

    monkeypatch.setattr(server_module, "MAX_MESSAGE", 1 << 20)

    async def items(size: int) -> AsyncIterator[bytes]:
        for _ in range(256):  # produced without a pause: one frame unless split
            yield b"y" * size

    nats_only = {"response_transport": "nats"}
    async with connected(servers, {}, {}, nats_only) as (callee, tcp, nats):
        await callee.serve_endpoint(unique_ns, "B", "items", items, request_type=int)
        for caller in (tcp, nats):
            client = caller.endpoint_client(unique_ns, "B", "items", response_type=bytes)
            got = [len(x) async for x in client(16_000)]  # ~4 MB produced at once
            assert got == [16_000] * 256
            with pytest.raises(RemoteError, match="ResponseTooLarge"):
                async for _ in client(2_000_000):
                    pass


async def test_a_caller_runtime_shut_down_stops_its_streams(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    async def forever(n: int) -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0.02)

    callee = await DistributedRuntime.connect(settings_for(servers))
    caller = await DistributedRuntime.connect(settings_for(servers))
    try:
        server = await callee.serve_endpoint(unique_ns, "F", "f", forever, request_type=int)
        stream = caller.endpoint_client(unique_ns, "F", "f", response_type=int)(0)
        async for i in stream:
            if i == 3:
                break  # still referenced: no cancel is sent
        await caller.shutdown()
        for _ in range(50):
            if server.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert server.in_flight == 0
    finally:
        await callee.shutdown()


CALLEE_SCRIPT = """
import asyncio, sys
from dynamo_sdk.runtime import DistributedRuntime, RuntimeSettings
from dynamo_sdk.runtime.security import EtcdSecurity

async def slow(n):
    i = 0
    while True:
        yield i
        i += 1
        await asyncio.sleep(0.05)

async def main():
    settings = RuntimeSettings(nats_url=sys.argv[1], etcd_endpoints=[sys.argv[2]],
                               etcd_security=EtcdSecurity.from_env())
    rt = await DistributedRuntime.connect(settings)
    await rt.serve_endpoint(sys.argv[3], "Slow", "generate", slow, request_type=int)
    print("serving", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_dead_callee_fails_its_streams_at_once(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """SIGKILL closes the callee's sockets: its streams fail then, not after the 5 s watchdog
    or the 10 s lease."""
    import signal
    import sys

    caller = await DistributedRuntime.connect(settings_for(servers))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CALLEE_SCRIPT, servers.nats.url, servers.etcd.url, unique_ns,
        env=child_env(servers), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"serving"
        client = caller.endpoint_client(unique_ns, "Slow", "generate", response_type=int)
        await client.wait_for_instance_ids(10.0)
        stream = client(0)
        assert await anext(stream) == 0
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(StreamLostError, match="closed mid-stream"):
            async for _ in stream:
                pass
        assert time.monotonic() - killed < 2.0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await caller.shutdown()
