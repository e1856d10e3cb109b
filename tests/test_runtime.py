"""The runtime against real NATS and etcd: streaming, errors, cancellation, routing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from dynamo_sdk.runtime import (
    DistributedRuntime,
    InstanceNotFoundError,
    NoInstancesError,
    RemoteError,
    StreamLostError,
)
from dynamo_sdk.serve.embedded import EmbeddedServers
from tests.conftest import child_env, settings_for


class Req(msgspec.Struct):
    text: str
    n: int = 3


class Part(msgspec.Struct):
    index: int
    text: str


async def test_stream_typed_items(runtime: DistributedRuntime, unique_ns: str) -> None:
    async def handler(req: Req) -> AsyncIterator[Part]:
        for i in range(req.n):
            yield Part(i, req.text)

    await runtime.serve_endpoint(unique_ns, "Echo", "generate", handler, request_type=Req)
    client = runtime.endpoint_client(unique_ns, "Echo", "generate", response_type=Part)
    items = [p async for p in client(Req("hi", n=5))]
    assert items == [Part(i, "hi") for i in range(5)]


async def test_single_answer_is_awaitable(runtime: DistributedRuntime, unique_ns: str) -> None:
    async def handler(req: Req) -> str:
        return req.text.upper()

    await runtime.serve_endpoint(
        unique_ns, "Upper", "call", handler, request_type=Req, streaming=False
    )
    client = runtime.endpoint_client(unique_ns, "Upper", "call")
    assert await client(Req("abc")) == "ABC"


async def test_large_fast_stream_arrives_in_order(
    runtime: DistributedRuntime, unique_ns: str
) -> None:
    async def handler(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    await runtime.serve_endpoint(unique_ns, "Count", "count", handler, request_type=int)
    client = runtime.endpoint_client(unique_ns, "Count", "count", response_type=int)
    got = [i async for i in client(20_000)]
    assert got == list(range(20_000))


async def test_next_batch_takes_what_arrived_together(
    runtime: DistributedRuntime, unique_ns: str
) -> None:
    async def handler(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i  # no pause: the items share frames and arrive together

    await runtime.serve_endpoint(unique_ns, "Burst", "count", handler, request_type=int)
    client = runtime.endpoint_client(unique_ns, "Burst", "count", response_type=int)
    stream = client(1000)
    batches = []
    while batch := await stream.next_batch():
        batches.append(batch)
        await asyncio.sleep(0.01)  # a consumer slower than the stream
    assert [i for b in batches for i in b] == list(range(1000))
    assert len(batches) < 100  # taken many at a time, not one call per item


async def test_remote_error_is_typed(runtime: DistributedRuntime, unique_ns: str) -> None:
    async def handler(req: Req) -> AsyncIterator[str]:
        yield "first"
        raise ValueError(f"bad text {req.text!r}")

    await runtime.serve_endpoint(unique_ns, "Boom", "generate", handler, request_type=Req)
    client = runtime.endpoint_client(unique_ns, "Boom", "generate")
    seen: list[str] = []
    with pytest.raises(RemoteError) as info:
        async for item in client(Req("x")):
            seen.append(item)
    assert seen == ["first"]
    assert info.value.error_type == "ValueError"
    assert "bad text 'x'" in str(info.value)


async def test_bad_request_payload_is_a_remote_error(
    runtime: DistributedRuntime, unique_ns: str
) -> None:
    async def handler(req: Req) -> AsyncIterator[str]:
        yield req.text

    await runtime.serve_endpoint(unique_ns, "Typed", "generate", handler, request_type=Req)
    client = runtime.endpoint_client(unique_ns, "Typed", "generate")
    with pytest.raises(RemoteError) as info:
        _ = [x async for x in client({"text": 42})]
    assert info.value.error_type == "BadRequestError"


async def test_no_instance_fails_fast(runtime: DistributedRuntime, unique_ns: str) -> None:
    client = runtime.endpoint_client(unique_ns, "Nobody", "generate")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoInstancesError, match="no live instance"):
        _ = [x async for x in client("hello")]
    assert loop.time() - started < 2.0


async def test_no_instance_waits_when_configured(
    servers: EmbeddedServers, runtime: DistributedRuntime, unique_ns: str
) -> None:
    caller = await DistributedRuntime.connect(settings_for(servers, wait_for_instances=10.0))
    try:
        client = caller.endpoint_client(unique_ns, "Late", "generate")

        async def start_late() -> None:
            await asyncio.sleep(0.5)

            async def handler(req: str) -> AsyncIterator[str]:
                yield req + "!"

            await runtime.serve_endpoint(unique_ns, "Late", "generate", handler, request_type=str)

        starter = asyncio.create_task(start_late())
        assert [x async for x in client("late")] == ["late!"]
        await starter
    finally:
        await caller.shutdown()


async def test_cancellation_reaches_callee(runtime: DistributedRuntime, unique_ns: str) -> None:
    stopped = asyncio.Event()
    seen: list[str] = []

    async def handler(n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, GeneratorExit) as exc:
            seen.append(type(exc).__name__)
            stopped.set()
            raise

    await runtime.serve_endpoint(unique_ns, "Slow", "generate", handler, request_type=int)
    client = runtime.endpoint_client(unique_ns, "Slow", "generate", response_type=int)
    got = []
    async for i in client(10_000):
        got.append(i)
        if len(got) == 2:
            break
    assert got == [0, 1]
    await asyncio.wait_for(stopped.wait(), 1.0)
    assert seen and seen[0] in {"CancelledError", "GeneratorExit"}


async def test_task_cancellation_reaches_callee(
    runtime: DistributedRuntime, unique_ns: str
) -> None:
    stopped = asyncio.Event()

    async def handler(n: int) -> AsyncIterator[int]:
        try:
            yield 0
            await asyncio.sleep(3600)
            yield 1
        finally:
            stopped.set()

    await runtime.serve_endpoint(unique_ns, "Hang", "generate", handler, request_type=int)
    client = runtime.endpoint_client(unique_ns, "Hang", "generate", response_type=int)

    async def consume() -> None:
        async for _ in client(1):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(stopped.wait(), 1.0)


async def _second_instance(
    servers: EmbeddedServers, ns: str, component: str, tag: str
) -> DistributedRuntime:
    rt = await DistributedRuntime.connect(settings_for(servers))

    async def handler(req: str) -> AsyncIterator[str]:
        yield tag

    await rt.serve_endpoint(ns, component, "who", handler, request_type=str)
    return rt


async def test_round_robin_and_direct(servers: EmbeddedServers, unique_ns: str) -> None:
    a = await _second_instance(servers, unique_ns, "Pool", "a")
    b = await _second_instance(servers, unique_ns, "Pool", "b")
    caller = await DistributedRuntime.connect(settings_for(servers))
    try:
        client = caller.endpoint_client(unique_ns, "Pool", "who")
        ids = await client.wait_for_instance_ids(5.0)
        while len(ids) < 2:
            await asyncio.sleep(0.05)
            ids = client.instance_ids()
        assert sorted(ids) == sorted([a.instance_id, b.instance_id])

        answers = [await client.round_robin("x") for _ in range(6)]
        assert answers.count("a") == 3 and answers.count("b") == 3
        assert answers[0] != answers[1]

        assert await client.direct(a.instance_id, "x") == "a"
        assert await client.direct(b.instance_id, "x") == "b"
        with pytest.raises(InstanceNotFoundError):
            await client.direct(0xDEAD, "x")

        spread = {await client("x") for _ in range(40)}
        assert spread == {"a", "b"}
        assert {await client.random("x") for _ in range(40)} == {"a", "b"}
    finally:
        for rt in (caller, a, b):
            await rt.shutdown()


async def test_instance_leaves_discovery_on_shutdown(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    a = await _second_instance(servers, unique_ns, "Gone", "a")
    caller = await DistributedRuntime.connect(settings_for(servers))
    try:
        client = caller.endpoint_client(unique_ns, "Gone", "who")
        assert await client.wait_for_instance_ids(5.0) == [a.instance_id]
        await a.shutdown()
        for _ in range(50):
            if not client.instance_ids():
                break
            await asyncio.sleep(0.05)
        assert client.instance_ids() == []
    finally:
        await caller.shutdown()


async def test_silent_callee_is_a_stream_lost_error(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """A callee that stops sending (no frames, no heartbeats) fails the stream, not hangs."""
    callee = await DistributedRuntime.connect(settings_for(servers))
    caller = await DistributedRuntime.connect(
        settings_for(servers, stream_timeout=1.0, heartbeat_interval=0.2)
    )
    try:

        async def handler(req: str) -> AsyncIterator[str]:
            yield "one"
            await asyncio.sleep(3600)
            yield "never"

        server = await callee.serve_endpoint(
            unique_ns, "Mute", "generate", handler, request_type=str
        )
        assert server._heartbeat_task is not None
        server._heartbeat_task.cancel()  # simulate a frozen process: no heartbeats
        client = caller.endpoint_client(unique_ns, "Mute", "generate")
        got = []
        with pytest.raises(StreamLostError):
            async for item in client("x"):
                got.append(item)
        assert got == ["one"]
    finally:
        await caller.shutdown()
        await callee.shutdown()


async def test_prefix_watcher_follows_leased_keys(
    servers: EmbeddedServers, runtime: DistributedRuntime, unique_ns: str
) -> None:
    owner = await DistributedRuntime.connect(settings_for(servers))
    watcher = runtime.watch_prefix(f"{unique_ns}/models/")
    await asyncio.wait_for(watcher.ready.wait(), 5)
    assert watcher.values == {}
    await owner.put_leased(f"{unique_ns}/models/a", b"1")
    for _ in range(50):
        if watcher.values:
            break
        await watcher.wait_for_change(0.1)
    assert watcher.values == {f"{unique_ns}/models/a": b"1"}
    await owner.shutdown()  # revokes the lease: its keys go with it
    for _ in range(50):
        if not watcher.values:
            break
        await watcher.wait_for_change(0.1)
    assert watcher.values == {}


async def test_items_keep_their_order_when_the_generator_pauses(
    runtime: DistributedRuntime, unique_ns: str
) -> None:
    """Regression: the last item, produced right after a pause, must not be overtaken by END."""

    async def handler(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            if i % 3 != 2:
                await asyncio.sleep(0)

    await runtime.serve_endpoint(unique_ns, "Pausing", "generate", handler, request_type=int)
    client = runtime.endpoint_client(unique_ns, "Pausing", "generate", response_type=int)
    for n in (1, 3, 6, 30):  # n % 3 == 0: the last item comes right after a pause
        results = await asyncio.gather(*([_collect(client, n) for _ in range(20)]))
        assert all(r == list(range(n)) for r in results)


async def _collect(client: Any, n: int) -> list[int]:
    return [i async for i in client(n)]


async def test_lease_survives_a_blocked_event_loop(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """Blocking code in a service (a slow load) must not make the instance vanish."""
    import time as _time

    callee = await DistributedRuntime.connect(settings_for(servers, lease_ttl=2))
    caller = await DistributedRuntime.connect(settings_for(servers))
    try:

        async def handler(req: str) -> AsyncIterator[str]:
            yield req

        await callee.serve_endpoint(unique_ns, "Busy", "generate", handler, request_type=str)
        client = caller.endpoint_client(unique_ns, "Busy", "generate")
        assert await client.wait_for_instance_ids(5) == [callee.instance_id]
        _time.sleep(5)  # block this (shared) loop for 2.5 TTLs
        await asyncio.sleep(0.5)
        assert client.instance_ids() == [callee.instance_id]
        assert not callee.lease_lost.is_set()
        assert await client("still here") == "still here"
    finally:
        await caller.shutdown()
        await callee.shutdown()


async def test_request_ids_are_unique_across_callers(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """Regression: a cancel from one caller must never drop another caller's request.

    Every instance of a component hears every cancel; with per-process counters as request ids,
    a cancel for caller A's call #1 made the other instance drop caller B's call #1 silently.
    """

    async def handler(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(0.01)

    x = await DistributedRuntime.connect(settings_for(servers))
    y = await DistributedRuntime.connect(settings_for(servers))
    a = await DistributedRuntime.connect(settings_for(servers))
    b = await DistributedRuntime.connect(settings_for(servers, stream_timeout=3.0))
    try:
        for rt in (x, y):
            await rt.serve_endpoint(unique_ns, "Twin", "count", handler, request_type=int)
        client_a = a.endpoint_client(unique_ns, "Twin", "count", response_type=int)
        client_b = b.endpoint_client(unique_ns, "Twin", "count", response_type=int)
        while len(client_b.instance_ids()) < 2 or len(client_a.instance_ids()) < 2:
            await asyncio.sleep(0.05)
        async for _ in client_a.direct(x.instance_id, 100):
            break  # cancels A's first call
        await asyncio.sleep(0.2)  # the cancel reaches both x and y
        assert [i async for i in client_b.direct(y.instance_id, 3)] == [0, 1, 2]
    finally:
        for rt in (a, b, x, y):
            await rt.shutdown()


CALLER_SCRIPT = """
import asyncio, sys
from dynamo_sdk.runtime import DistributedRuntime, RuntimeSettings
from dynamo_sdk.runtime.security import EtcdSecurity

async def main():
    settings = RuntimeSettings(nats_url=sys.argv[1], etcd_endpoints=[sys.argv[2]],
                               etcd_security=EtcdSecurity.from_env())
    settings.response_transport = sys.argv[4]
    rt = await DistributedRuntime.connect(settings)
    client = rt.endpoint_client(sys.argv[3], "Long", "generate", response_type=int)
    async for item in client(10**6):
        if item == 2:
            print("streaming", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("transport", ["tcp", "nats"])
async def test_a_dead_caller_cancels_its_streams(
    servers: EmbeddedServers, unique_ns: str, transport: str
) -> None:
    """A caller killed with SIGKILL must not leave the callee generating for nobody.

    Over TCP its connection drops; over NATS, NATS answers "no responders" to a heartbeat.
    """
    import signal
    import sys

    callee = await DistributedRuntime.connect(settings_for(servers, heartbeat_interval=0.3))
    stopped = asyncio.Event()

    async def handler(n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0.01)
        finally:
            stopped.set()

    try:
        await callee.serve_endpoint(unique_ns, "Long", "generate", handler, request_type=int)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CALLER_SCRIPT, servers.nats.url, servers.etcd.url, unique_ns,
            transport,
            env=child_env(servers), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"streaming"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await asyncio.wait_for(stopped.wait(), 3.0)  # a few heartbeat intervals
    finally:
        await callee.shutdown()


CALLEE_SCRIPT = """
import asyncio, sys
from dynamo_sdk.runtime import DistributedRuntime, RuntimeSettings
from dynamo_sdk.runtime.security import EtcdSecurity

async def main():
    settings = RuntimeSettings(nats_url=sys.argv[1], etcd_endpoints=[sys.argv[2]],
                               etcd_security=EtcdSecurity.from_env(), lease_ttl=30)
    rt = await DistributedRuntime.connect(settings)

    async def handler(n: int):
        for i in range(n):
            yield i
            await asyncio.sleep(0.01)

    await rt.serve_endpoint(sys.argv[3], "Mortal", "generate", handler, request_type=int)
    print(f"{rt.instance_id:x}", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize("when", ["mid_stream", "between_calls"])
async def test_a_killed_instance_leaves_routing_at_once(
    servers: EmbeddedServers, unique_ns: str, when: str
) -> None:
    """SIGKILL a callee: its lease (30 s here) keeps it in etcd, but the caller stops routing
    to it as soon as a call sees it fail, through its closed connection (mid-stream) or NATS's
    "no responders" (the next call to it); then every call goes to the live instance."""
    import signal
    import sys

    live = await DistributedRuntime.connect(settings_for(servers))

    async def handler(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    caller = await DistributedRuntime.connect(settings_for(servers))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CALLEE_SCRIPT, servers.nats.url, servers.etcd.url, unique_ns,
        env=child_env(servers), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await live.serve_endpoint(unique_ns, "Mortal", "generate", handler, request_type=int)
        assert proc.stdout is not None
        mortal = int((await asyncio.wait_for(proc.stdout.readline(), 30)).strip(), 16)
        client = caller.endpoint_client(unique_ns, "Mortal", "generate", response_type=int)
        while len(client.instance_ids()) < 2:
            await asyncio.sleep(0.05)
        if when == "mid_stream":
            with pytest.raises(StreamLostError):
                async for i in client.direct(mortal, 10**6):
                    if i == 3:
                        proc.send_signal(signal.SIGKILL)
        else:
            assert await client.direct(mortal, 1) == 0
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            with pytest.raises(NoInstancesError):
                await client.direct(mortal, 1)
        assert client.instance_ids() == [live.instance_id], "still routed to the dead instance"
        assert [await client.round_robin(1) for _ in range(10)] == [0] * 10
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        for rt in (caller, live):
            await rt.shutdown()


async def test_a_suspended_instance_comes_back_unless_it_left(
    servers: EmbeddedServers, unique_ns: str
) -> None:
    """A suspension is a caller's suspicion, not etcd's verdict: a live instance (a false
    alarm: a connection that alone broke) is routed to again after the suspension; one whose
    key etcd deleted meanwhile is not; the last routable instance is never suspended."""
    a = await _second_instance(servers, unique_ns, "Doubt", "a")
    b = await _second_instance(servers, unique_ns, "Doubt", "b")
    c = await _second_instance(servers, unique_ns, "Doubt", "c")
    caller = await DistributedRuntime.connect(settings_for(servers))
    try:
        client = caller.endpoint_client(unique_ns, "Doubt", "who")
        while len(client.instance_ids()) < 3:
            await asyncio.sleep(0.05)
        watcher = client.watcher
        assert watcher.suspend(a.instance_id, 0.5) and watcher.suspend(b.instance_id, 0.5)
        assert not watcher.suspend(b.instance_id, 0.5), "already suspended"
        assert not watcher.suspend(c.instance_id, 0.5), "the last routable one"
        assert client.instance_ids() == [c.instance_id]
        await b.shutdown()  # its key goes while it is suspended
        await asyncio.sleep(1.0)
        assert client.instance_ids() == sorted([a.instance_id, c.instance_id])
        assert {await client.round_robin("x") for _ in range(4)} == {"a", "c"}
    finally:
        for rt in (caller, a, c):
            await rt.shutdown()
