"""`dynamo serve` starting and stopping as a person at a terminal sees it.

The ready line, a taken port, a worker that cannot start as configured, and a terminal's
Ctrl-C (SIGINT to the whole foreground process group, embedded servers included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dynamo_sdk.serve.embedded import free_port
from tests.serving import HELLO_DIR, REPO_ROOT

pytestmark = pytest.mark.slow

DYNAMO = [sys.executable, "-m", "dynamo_sdk.cli.main"]


def _serve(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`dynamo serve` as the leader of its own process group, on its own embedded servers."""
    full = {k: v for k, v in os.environ.items() if k not in ("NATS_SERVER", "ETCD_ENDPOINTS")}
    full.update(env, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*DYNAMO, "serve", *args],
            cwd=HELLO_DIR,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {text!r}:\n{out}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_ready_line_then_terminal_ctrl_c_drains_cleanly(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(
        ["graphs.hello:Frontend", "-f", "configs/hello.yaml", f"--Frontend.port={port}"], log
    )
    try:
        out = _wait(proc, log, "ready: http://", 90)
        assert f"ready: http://127.0.0.1:{port} (Frontend)" in out
        answer = httpx.post(f"http://127.0.0.1:{port}/generate", json={"text": "a b"}, timeout=10)
        assert answer.status_code == 200
        # what a terminal's Ctrl-C does: SIGINT to every process of the foreground group
        began = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        took = time.monotonic() - began
        out = log.read_text(errors="replace")
        # the embedded NATS and etcd outlived the workers' drain: nobody lost its connection
        assert "NATS: disconnected" not in out and "watch on" not in out, out
        assert "killing them" not in out and took < 10, out
    finally:
        _stop(proc)


def test_a_taken_port_fails_at_once_naming_port_and_service(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        began = time.monotonic()
        log = tmp_path / "serve.log"
        proc = _serve(
            ["graphs.hello:Frontend", "-f", "configs/hello.yaml", f"--Frontend.port={port}"], log
        )
        try:
            assert proc.wait(30) != 0
        finally:
            _stop(proc)
        out = log.read_text()
        assert f"port {port} (Frontend) is already in use" in out
        assert "started" not in out  # nothing was started
        assert time.monotonic() - began < 20
    finally:
        holder.close()


def test_a_worker_that_cannot_start_stops_the_graph(tmp_path: Path) -> None:
    """A configuration error raised in a worker ends `dynamo serve` with that reason instead
    of a restart loop."""
    graph = tmp_path / "late_port.py"
    graph.write_text(
        "from dynamo_sdk import ConfigurationError, async_on_start, service\n"
        "@service(dynamo={'namespace': 'late'})\n"
        "class Stubborn:\n"
        "    @async_on_start\n"
        "    async def start(self):\n"
        "        raise ConfigurationError('model folder /nowhere does not exist')\n"
    )
    log = tmp_path / "serve.log"
    proc = _serve(["late_port:Stubborn", "--working-dir", str(tmp_path)], log)
    try:
        assert proc.wait(60) == 1
    finally:
        _stop(proc)
    out = log.read_text()
    assert "Stubborn:0 cannot start as configured: model folder /nowhere does not exist" in out
    assert "restart #" not in out


def _port_open(proc: subprocess.Popen[bytes], base: str, log: Path) -> httpx.Response:
    """Poll until the Frontend's port answers at all; its first /health answer."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(f"{base}/health", timeout=2)
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)


CHAT = {"model": "dynamo-mocker", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_a_listed_model_can_be_served_at_once(tmp_path: Path) -> None:
    """With no start-up wait, a model the Frontend lists must be servable the moment it is
    listed (it is listed only once a worker's endpoint is registered, not when the worker
    announced it); /live answers from the first moment, /health only once ready."""
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve_llm(port, log, "--Frontend.startup_wait=0")
    base = f"http://127.0.0.1:{port}"
    try:
        first = _port_open(proc, base, log)
        assert httpx.get(f"{base}/live", timeout=2).status_code == 200
        if first.status_code == 503:
            assert first.json()["models"] == []
        deadline = time.monotonic() + 60
        while not httpx.get(f"{base}/v1/models", timeout=2).json()["data"]:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        answer = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{base}/health", timeout=2).status_code == 200
    finally:
        _stop(proc)


def test_a_request_in_the_start_up_gap_waits_for_the_first_worker(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve_llm(port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        _port_open(proc, base, log)
        # sent at once, most likely before the worker is live: it waits, then succeeds
        answer = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        _stop(proc)


def test_an_unknown_model_is_404_at_once_when_others_are_live(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve_llm(port, log)
    try:
        _wait(proc, log, "ready: http://", 90)
        began = time.monotonic()
        body = {**CHAT, "model": "nope"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 404 and time.monotonic() - began < 2  # a typo is not waited for
    finally:
        _stop(proc)


def _serve_llm(port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if k not in ("NATS_SERVER", "ETCD_ENDPOINTS")}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*DYNAMO, "serve", "graphs.agg:Frontend", "-f", "configs/agg_mocker.yaml",
             f"--Frontend.port={port}", *extra],
            cwd=REPO_ROOT, env=full, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
