"""Outages ridden out: an etcd paused past the lease TTL costs discovery for its length, not
the process. Each test starts its own nats-server and etcd (it pauses them)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.serve.embedded import EmbeddedServers, start_embedded
from tests.conftest import settings_for


@pytest.fixture
def own_servers(tmp_path: Path) -> Iterator[EmbeddedServers]:
    with start_embedded(tmp_path / "servers") as started:
        yield started


async def until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_lease_lost_in_an_etcd_pause_is_granted_again(
    own_servers: EmbeddedServers,
) -> None:
    """etcd stopped (SIGSTOP) for 2.5x the callee's 2 s lease TTL: calls over NATS go on
    during the pause; afterwards the callee holds a new lease, under which its instance key
    (same instance id) and its other leased keys are back, with no restart."""
    callee = await DistributedRuntime.connect(settings_for(own_servers, lease_ttl=2))
    caller = await DistributedRuntime.connect(settings_for(own_servers))
    etcd = own_servers.etcd.proc

    async def handler(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    try:
        await callee.serve_endpoint("outage", "Steady", "generate", handler, request_type=int)
        await callee.put_leased("outage/extra", b"kept")
        instance, first_lease = callee.instance_id, callee.lease.id
        client = caller.endpoint_client("outage", "Steady", "generate", response_type=int)
        assert await client.wait_for_instance_ids(5.0) == [instance]

        etcd.send_signal(signal.SIGSTOP)
        try:
            await until(callee.lease_lost.is_set, 10, "the callee to see its lease lost")
            # the caller's view of discovery is frozen, not gone: calls still reach the callee
            assert [i async for i in client.direct(instance, 3)] == [0, 1, 2]
        finally:
            etcd.send_signal(signal.SIGCONT)

        await until(lambda: callee.lease_regrants >= 1, 20, "a new lease")
        assert not callee.lease_lost.is_set()
        assert callee.lease.id != first_lease and callee.instance_id == instance
        await until(lambda: client.instance_ids() == [instance], 10, "the instance key again")
        assert [i async for i in client.direct(instance, 2)] == [0, 1]
        extra = await caller.etcd.get(b"outage/extra")
        assert extra is not None and extra.value == b"kept"
        # the keys are bound to the new lease: they outlive the old one's expiry for good
        await asyncio.sleep(2.5)
        assert client.instance_ids() == [instance]
    finally:
        await caller.shutdown()
        await callee.shutdown()


@pytest.mark.slow
def test_a_served_graph_rides_out_a_15_s_etcd_pause(
    own_servers: EmbeddedServers, tmp_path: Path
) -> None:
    """The issue's outage: etcd paused 15 s under a served graph (the Frontend with its
    Worker, lease TTL 5 s). Requests keep being answered during the pause and after it, and
    no process exits or is restarted."""
    import httpx

    from dynamo_sdk.serve.embedded import free_port
    from tests.serving import REPO_ROOT, ServeProcess, answers_a_completion

    port = free_port()
    serve = ServeProcess(
        ["graphs.agg:Frontend", "-f", "configs/agg_echo.yaml", f"--Frontend.port={port}"],
        cwd=REPO_ROOT,
        env={**own_servers.env(), "DYN_LEASE_TTL": "5"},
        log_path=tmp_path / "serve.log",
    )
    base = f"http://127.0.0.1:{port}/v1"
    body = {"model": "echo", "prompt": "still here", "max_tokens": 4}
    try:

        def registered() -> bool:  # both processes ready and in etcd before the pause
            return serve.output().count("ready: instance") >= 2 and answers_a_completion(
                base, "echo"
            )

        serve.wait_for(registered, 60, "the echo graph")
        started = serve.output().count("started ")
        etcd = own_servers.etcd.proc
        failed = answered = 0
        etcd.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                ok = httpx.post(f"{base}/completions", json=body, timeout=10).status_code == 200
                answered, failed = answered + ok, failed + (not ok)
                time.sleep(0.25)
        finally:
            etcd.send_signal(signal.SIGCONT)
        assert answered and not failed, f"{failed} requests failed during the pause"
        serve.wait_for(lambda: "etcd lease re-granted" in serve.output(), 30, "a new lease")
        for _ in range(20):
            assert httpx.post(f"{base}/completions", json=body, timeout=10).status_code == 200
            time.sleep(0.1)
        log = serve.output()
        assert log.count("started ") == started, "a process was restarted"
        assert "exited with code" not in log and "liveness probe" not in log
    finally:
        serve.stop()


async def test_a_key_etcd_cannot_take_now_is_written_once_it_answers(
    own_servers: EmbeddedServers,
) -> None:
    """Registering while etcd is paused does not fail the service's start: the key is
    written (under a new lease) once etcd answers again."""
    callee = await DistributedRuntime.connect(settings_for(own_servers, lease_ttl=3))
    caller = await DistributedRuntime.connect(settings_for(own_servers))
    etcd = own_servers.etcd.proc

    async def handler(n: int) -> AsyncIterator[int]:
        yield n

    try:
        client = caller.endpoint_client("outage", "Late", "generate", response_type=int)
        etcd.send_signal(signal.SIGSTOP)
        try:
            await callee.serve_endpoint("outage", "Late", "generate", handler, request_type=int)
        finally:
            etcd.send_signal(signal.SIGCONT)
        await until(lambda: client.instance_ids() == [callee.instance_id], 20, "the late key")
        assert await client.direct(callee.instance_id, 5) == 5
    finally:
        await caller.shutdown()
        await callee.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["nats-server", "etcd"])
def test_dynamo_serve_restarts_its_embedded_server(tmp_path: Path, victim: str) -> None:
    """`dynamo serve` on the embedded default: SIGKILL its nats-server (or etcd). It is
    restarted on the same port and the graph serves again within 5 s, no worker restarted."""
    import os

    import httpx
    import psutil

    from dynamo_sdk.serve.embedded import free_port
    from tests.serving import REPO_ROOT, ServeProcess, answers_a_completion

    port = free_port()
    serve = ServeProcess(
        ["graphs.agg:Frontend", "-f", "configs/agg_echo.yaml", f"--Frontend.port={port}"],
        cwd=REPO_ROOT,
        env={"DYN_LEASE_TTL": "5"},
        log_path=tmp_path / "serve.log",
    )
    base = f"http://127.0.0.1:{port}/v1"
    body = {"model": "echo", "prompt": "still here", "max_tokens": 4}

    def ok() -> bool:
        try:
            return httpx.post(f"{base}/completions", json=body, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        serve.wait_for(
            lambda: (
                serve.output().count("ready: instance") >= 2 and answers_a_completion(base, "echo")
            ),
            60,
            "the echo graph",
        )
        started = serve.output().count("started ")
        (server,) = [
            p for p in psutil.Process(serve.proc.pid).children(recursive=True)
            if p.name() == victim
        ]  # fmt: skip
        os.kill(server.pid, 9)
        killed = time.monotonic()
        failing_since: float | None = None
        longest = 0.0
        while time.monotonic() - killed < 12:
            if ok():
                if failing_since is not None:
                    longest = max(longest, time.monotonic() - failing_since)
                    failing_since = None
            elif failing_since is None:
                failing_since = time.monotonic()
            time.sleep(0.1)
        assert failing_since is None, "the graph did not serve again"
        assert longest <= 5.0, f"{longest:.1f} s of failed requests"
        log = serve.output()
        assert f"embedded {victim} is back" in log
        assert log.count("started ") == started, "a worker was restarted"
    finally:
        serve.stop()


async def test_health_is_503_while_nats_is_away_and_live_stays_200(
    own_servers: EmbeddedServers,
) -> None:
    """The Frontend's /health says whether the graph can serve (not only whether a model was
    announced): with NATS gone it is 503 and says why, /live stays 200, and both recover."""
    import httpx

    from dynamo_sdk.llm.frontend import OpenAIServer
    from dynamo_sdk.llm.serving import PipelineConfig, ServedModels

    rt = await DistributedRuntime.connect(settings_for(own_servers))
    backend = ServedModels(rt, PipelineConfig())
    backend.model_names = lambda: ["m"]  # type: ignore[method-assign] (no worker needed here)
    app = OpenAIServer(backend).app
    nats_server = own_servers.nats
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            assert (await client.get("/health")).status_code == 200
            nats_server.proc.kill()
            nats_server.proc.wait()
            await until(lambda: not rt.nc.is_connected, 10, "the disconnect")
            down = await client.get("/health")
            assert down.status_code == 503 and "NATS" in down.json()["status"]
            assert (await client.get("/live")).status_code == 200
            await asyncio.to_thread(nats_server.restart)
            await until(lambda: rt.nc.is_connected, 15, "the reconnect")
            assert (await client.get("/health")).status_code == 200
    finally:
        await rt.shutdown()
