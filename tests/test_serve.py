"""`dynamo serve` end to end: real supervisor, real worker processes, real NATS and etcd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.runtime.discovery import connect_etcd
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port
from tests.conftest import settings_for
from tests.serving import HELLO_DIR, ServeProcess, run_dynamo, wait_until_serving

pytestmark = pytest.mark.slow


def _hello(
    servers: EmbeddedServers, tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[ServeProcess, str]:
    port = free_port()
    serve = ServeProcess(
        ["graphs.hello:Frontend", "-f", "configs/hello.yaml", f"--Frontend.port={port}", *extra],
        cwd=HELLO_DIR,
        env={**servers.env(), **(env or {})},
        log_path=tmp_path / "serve.log",
    )
    return serve, f"http://127.0.0.1:{port}/generate"


def test_hello_graph_streams_and_takes_cli_overrides(
    servers: EmbeddedServers, tmp_path: Path
) -> None:
    serve, url = _hello(servers, tmp_path, "--Backend.suffix=-x")
    try:
        answer = wait_until_serving(serve, url, {"text": "hello world"})
        assert [json.loads(line) for line in answer] == ["mid:hello", "mid:world-mid-x"]
        # both Backend workers and the others carry their name and index in the logs
        out = serve.output()
        for label in ("Backend:0", "Backend:1", "Middle:0", "Frontend:0"):
            assert f"[{label}]" in out
        # a body that does not match the route's type is a clear 422, not a traceback
        bad = httpx.post(url, json={"txt": 1}, timeout=10)
        assert bad.status_code == 422
        assert bad.json()["error"]["type"] == "invalid_request_error"
    finally:
        serve.stop()


async def _instance_keys(servers: EmbeddedServers, prefix: str) -> list[str]:
    client = await connect_etcd([servers.etcd.url], security=servers.etcd_security)
    try:
        return [kv.key.decode() for kv in await client.get_prefix(prefix.encode())]
    finally:
        await client.close()


def test_killed_backend_mid_stream(servers: EmbeddedServers, tmp_path: Path) -> None:
    serve, url = _hello(
        servers,
        tmp_path,
        "--Backend.ServiceArgs.workers=1",
        "--Backend.delay=0.2",
        env={"DYN_LEASE_TTL": "3", "DYN_STREAM_TIMEOUT": "2", "DYN_HEARTBEAT_INTERVAL": "0.5"},
    )
    try:
        wait_until_serving(serve, url, {"text": "warm up"})
        prefix = "instances/hello/Backend/generate:"
        keys_before = asyncio.run(_instance_keys(servers, prefix))
        assert len(keys_before) == 1
        [pid] = serve.worker_pids("Backend:0")

        lines: list[str] = []
        started = time.monotonic()
        with httpx.stream(
            "POST", url, json={"text": " ".join(["w"] * 200)}, timeout=30
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:
                    os.kill(pid, signal.SIGKILL)
        elapsed = time.monotonic() - started
        # the caller got a typed error in-band, quickly, rather than hanging or a silent cut
        assert len(lines) < 200
        error = json.loads(lines[-1])["error"]
        assert "StreamLostError" in error["message"] or "left discovery" in error["message"]
        assert elapsed < 15

        # the supervisor logs the crash and restarts the worker
        serve.wait_for(lambda: len(serve.worker_pids("Backend:0")) == 2, 30, "Backend:0 restart")
        assert "Backend:0 exited with code -9; restart #1" in serve.output()

        # the dead instance leaves discovery within the lease TTL, the new one registers
        def rotated() -> bool:
            keys = asyncio.run(_instance_keys(servers, prefix))
            return len(keys) == 1 and keys != keys_before

        serve.wait_for(rotated, 3 + 10, "the dead instance to leave discovery")
        answer = wait_until_serving(serve, url, {"text": "after restart"})
        assert [json.loads(line) for line in answer] == ["mid:after", "mid:restart-mid-back"]
    finally:
        serve.stop()


GPU_GRAPH = textwrap.dedent(
    """
    import os
    from dynamo_sdk import endpoint, service

    @service(dynamo={"namespace": "gpuprobe"}, resources={"gpu": 1}, workers=2)
    class Pinned:
        @endpoint()
        async def visible(self, req: str):
            yield os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    """
)


def test_gpu_pinning_with_faked_gpus(servers: EmbeddedServers, tmp_path: Path) -> None:
    (tmp_path / "gpu_graph.py").write_text(GPU_GRAPH)
    dry = run_dynamo(
        ["serve", "gpu_graph:Pinned", "--dry-run"], cwd=tmp_path, env={"DYNAMO_GPUS": "0,1"}
    )
    assert dry.returncode == 0, dry.stderr
    assert "CUDA_VISIBLE_DEVICES=0\n" in dry.stdout and "CUDA_VISIBLE_DEVICES=1\n" in dry.stdout

    peers = run_dynamo(
        ["serve", "gpu_graph:Pinned", "--dry-run", "--Pinned.ServiceArgs.peer_gpus=true"],
        cwd=tmp_path,
        env={"DYNAMO_GPUS": "0,1"},
    )
    assert peers.returncode == 0, peers.stderr
    # each sees the other's GPU too, after its own (its own stays cuda:0)
    assert "CUDA_VISIBLE_DEVICES=0,1   (own: 1)" in peers.stdout
    assert "CUDA_VISIBLE_DEVICES=1,0   (own: 1)" in peers.stdout

    too_few = run_dynamo(
        ["serve", "gpu_graph:Pinned", "--dry-run"], cwd=tmp_path, env={"DYNAMO_GPUS": "0"}
    )
    assert too_few.returncode != 0
    assert "needs 2 GPUs" in too_few.stderr and "Traceback" not in too_few.stderr

    serve = ServeProcess(
        ["gpu_graph:Pinned"],
        cwd=tmp_path,
        env={**servers.env(), "DYNAMO_GPUS": "0,1"},
        log_path=tmp_path / "serve.log",
    )

    async def collect() -> set[str]:
        rt = await DistributedRuntime.connect(settings_for(servers))
        try:
            client = rt.endpoint_client("gpuprobe", "Pinned", "visible")
            deadline = time.monotonic() + 60
            while len(client.instance_ids()) < 2:
                assert time.monotonic() < deadline, serve.output()
                await asyncio.sleep(0.2)
            return {await client.direct(i, "x") for i in client.instance_ids()}
        finally:
            await rt.shutdown()

    try:
        assert asyncio.run(collect()) == {"0", "1"}
    finally:
        serve.stop()


def test_ctrl_c_exits_zero_without_orphans(tmp_path: Path) -> None:
    """Embedded default: the supervisor also owns nats-server and etcd; Ctrl-C stops them all."""
    port = free_port()
    serve = ServeProcess(
        ["graphs.hello:Frontend", "-f", "configs/hello.yaml", f"--Frontend.port={port}"],
        cwd=HELLO_DIR,
        env={},
        log_path=tmp_path / "serve.log",
    )
    try:
        wait_until_serving(serve, f"http://127.0.0.1:{port}/generate", {"text": "hi"})
        pids = serve.descendants()
        names = {psutil.Process(p).name() for p in pids}
        assert {"nats-server", "etcd"} <= names, names
        assert len(pids) >= 6  # 2 servers + Frontend, Middle, 2 Backends
        assert serve.interrupt() == 0, serve.output()
        time.sleep(0.5)
        alive = [
            p
            for p in pids
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        assert alive == [], f"orphans left: {alive}"
        assert "all workers stopped" in serve.output()
    finally:
        serve.stop()


def test_drain_lets_in_flight_stream_finish(servers: EmbeddedServers, tmp_path: Path) -> None:
    serve, url = _hello(servers, tmp_path, "--Backend.delay=0.1")
    try:
        wait_until_serving(serve, url, {"text": "warm"})
        lines: list[str] = []
        with httpx.stream("POST", url, json={"text": "a b c d e f g h"}, timeout=30) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 1:
                        serve.proc.send_signal(signal.SIGINT)
        assert [json.loads(x) for x in lines][-1] == "mid:h-mid-back"
        assert serve.proc.wait(30) == 0
    finally:
        serve.stop()


def test_cli_basics(tmp_path: Path) -> None:
    assert run_dynamo(["--version"], cwd=tmp_path).stdout.strip().endswith("0.1.0")
    helped = run_dynamo(["-h"], cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout and "env" in helped.stdout
    env = run_dynamo(["env"], cwd=tmp_path, env={"DYNAMO_GPUS": ""})
    assert env.returncode == 0
    assert (
        "nats-server" in env.stdout
        and "etcd" in env.stdout
        and "gpus            none" in env.stdout
    )


def test_dry_run_and_config_errors(tmp_path: Path) -> None:
    dry = run_dynamo(
        [
            "serve",
            "graphs.hello:Frontend",
            "-f",
            "configs/hello.yaml",
            "--dry-run",
            "--Backend.suffix=-z",
        ],
        cwd=HELLO_DIR,
    )
    assert dry.returncode == 0, dry.stderr
    for name in ("Frontend", "Middle", "Backend"):
        assert f"- {name}" in dry.stdout
    assert '"suffix": "-z"' in dry.stdout and "workers: 2" in dry.stdout

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("Backend: {}\nNoSuchService: {x: 1}\n")
    unknown = run_dynamo(
        ["serve", "graphs.hello:Frontend", "-f", str(bad_yaml), "--dry-run"], cwd=HELLO_DIR
    )
    assert unknown.returncode != 0 and "NoSuchService" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    missing = run_dynamo(["serve", "graphs.nope:Frontend", "--dry-run"], cwd=HELLO_DIR)
    assert missing.returncode != 0 and "graphs.nope" in missing.stderr


PROBED_GRAPH = textwrap.dedent(
    """
    import os, time
    from dynamo_sdk import endpoint, liveness, readiness, service

    FLAGS = os.environ["PROBE_FLAGS"]

    @service(dynamo={"namespace": "probed"})
    class Probed:
        def __init__(self):
            self.born = time.monotonic()

        @liveness
        def alive(self):
            # the first incarnation turns unhealthy; its replacement stays healthy
            return not os.path.exists(os.path.join(FLAGS, "sick")) or (
                os.path.exists(os.path.join(FLAGS, "cured"))
            )

        @readiness
        def ready(self):
            return os.path.exists(os.path.join(FLAGS, "ready"))

        @endpoint()
        async def ping(self, req: str):
            yield "pong"
    """
)


def test_readiness_gates_registration_and_liveness_restarts(
    servers: EmbeddedServers, tmp_path: Path
) -> None:
    (tmp_path / "probed_graph.py").write_text(PROBED_GRAPH)
    flags = tmp_path / "flags"
    flags.mkdir()
    serve = ServeProcess(
        ["probed_graph:Probed"],
        cwd=tmp_path,
        env={
            **servers.env(),
            "PROBE_FLAGS": str(flags),
            "DYN_HEALTH_INTERVAL": "0.3",
            "DYN_HEALTH_FAILURES": "2",
        },
        log_path=tmp_path / "serve.log",
    )

    async def instances(wait: float) -> list[int]:
        rt = await DistributedRuntime.connect(settings_for(servers))
        try:
            client = rt.endpoint_client("probed", "Probed", "ping")
            await client.watcher.ready.wait()
            await asyncio.sleep(wait)
            return client.instance_ids()
        finally:
            await rt.shutdown()

    try:
        serve.wait_for(lambda: bool(serve.worker_pids("Probed:0")), 30, "the worker to start")
        time.sleep(2.0)
        assert asyncio.run(instances(0.5)) == [], "registered before readiness passed"
        (flags / "ready").touch()
        serve.wait_for(lambda: "ready: instance" in serve.output(), 30, "readiness")
        assert len(asyncio.run(instances(0.2))) == 1

        (flags / "sick").touch()
        serve.wait_for(
            lambda: "failed its liveness probe" in serve.output(), 30, "the liveness kill"
        )
        (flags / "cured").touch()
        serve.wait_for(lambda: len(serve.worker_pids("Probed:0")) == 2, 30, "the restart")
        assert "Probed:0 exited with code -9; restart #1" in serve.output()
    finally:
        serve.stop()
