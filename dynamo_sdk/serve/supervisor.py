"""The supervisor behind `dynamo serve`: one OS process per worker, kept alive, drained on exit.

Each worker runs `python -m dynamo_sdk.serve.host` in its own session (so a terminal's Ctrl-C
reaches the supervisor alone, which then drains the workers in order) with the parent-death
signal set (so killing the supervisor leaves no orphans). Its output is relayed line by line
with a `[Service:index]` prefix. A worker that exits while the graph is running is restarted
with exponential backoff; one whose `/livez` probe fails repeatedly is killed and restarted.
A worker that exits with `EXIT_CONFIG` cannot start as configured: the graph is stopped and
`dynamo serve` exits non-zero with that worker's reason, instead of restarting it forever.
An HTTP service's listening socket is bound once, before anything starts (`run.bind_http`), and
inherited by each of its workers (`DYN_HTTP_FD`): the one free to accept takes the next
connection, and a restarted worker finds the connections that queued meanwhile.

Once every worker answers `/readyz`, one line says the graph can serve, and where:
`ready: http://127.0.0.1:8000 (model dynamo-tiny, 1 worker)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from dynamo_sdk.sdk.errors import EXIT_CONFIG
from dynamo_sdk.serve.embedded import free_port
from dynamo_sdk.serve.gpus import cuda_visible_devices
from dynamo_sdk.serve.procutil import die_with_parent

log = logging.getLogger("dynamo.supervisor")


@dataclass
class WorkerPlan:
    """What to start: one worker of one service, its GPUs and extra environment."""

    service: str
    index: int
    gpus: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    peer_gpus: list[int] = field(default_factory=list)  # other workers' GPUs it may also see

    @property
    def label(self) -> str:
        return f"{self.service}:{self.index}"


@dataclass
class RestartPolicy:
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    stable_after: float = 30.0  # a worker that lived this long restarts with the initial backoff


@dataclass
class HealthPolicy:
    interval: float = 2.0  # DYN_HEALTH_INTERVAL
    failures_to_restart: int = 3  # DYN_HEALTH_FAILURES
    timeout: float = 2.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> HealthPolicy:
        env = os.environ if environ is None else environ
        try:
            return cls(
                interval=float(env.get("DYN_HEALTH_INTERVAL", cls.interval)),
                failures_to_restart=int(env.get("DYN_HEALTH_FAILURES", cls.failures_to_restart)),
            )
        except ValueError as exc:
            raise ValueError(f"bad DYN_HEALTH_INTERVAL / DYN_HEALTH_FAILURES: {exc}") from None


@dataclass
class WorkerState:
    plan: WorkerPlan
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    health_port: int = 0
    pids: list[int] = field(default_factory=list)
    last_line: str = ""  # the latest line it printed (a worker's reason for exiting)


async def _get(port: int, path: str, timeout: float) -> tuple[int, bytes] | None:
    """GET a worker's health route on loopback: (status, body), None when nothing listens."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
        head, _, body = raw.partition(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        return (int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0), body
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def probe_livez(port: int, timeout: float) -> bool | None:
    """GET /livez: True/False for an answer, None when nothing listens yet."""
    answer = await _get(port, "/livez", timeout)
    return None if answer is None else answer[0] == 200


async def probe_readyz(port: int, timeout: float) -> str | None:
    """GET /readyz: what is ready ("" if it does not say) once ready, else None."""
    answer = await _get(port, "/readyz", timeout) if port else None
    if answer is None or answer[0] != 200:
        return None
    try:
        detail = json.loads(answer[1]).get("detail", "")
    except (ValueError, AttributeError):
        detail = ""
    return str(detail or "")


class Supervisor:
    """Starts every planned worker and keeps the graph running until told to stop."""

    def __init__(
        self,
        graph: str,
        plans: list[WorkerPlan],
        *,
        base_env: dict[str, str],
        cwd: str,
        grace: float = 10.0,
        restart: RestartPolicy | None = None,
        health: HealthPolicy | None = None,
        out: TextIO | None = None,
        http: dict[str, tuple[str, int]] | None = None,
        http_sockets: dict[str, int] | None = None,
    ) -> None:
        self.graph = graph
        self.workers = [WorkerState(plan) for plan in plans]
        self.http = http or {}  # services that serve HTTP: (host, port)
        self.http_sockets = http_sockets or {}  # their listening sockets' fds, inherited
        self.exit_code = 0
        self.base_env = base_env
        self.cwd = cwd
        self.grace = grace
        self.restart = restart or RestartPolicy()
        self.health = health or HealthPolicy.from_env()
        self.out = out or sys.stdout
        self.stopping = asyncio.Event()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: draining %d worker(s)", len(self.workers))
            self.stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        tasks = [asyncio.create_task(self._supervise(w)) for w in self.workers]
        announcer = asyncio.create_task(self._announce_ready())
        await self.stopping.wait()
        announcer.cancel()
        await self._stop_all()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("all workers stopped")
        return self.exit_code

    async def _announce_ready(self) -> None:
        """Print one line once every worker is ready: the graph can serve, and where."""
        details: dict[str, str] = {}
        while True:
            for state in self.workers:
                if state.plan.label in details:
                    continue
                answer = await probe_readyz(state.health_port, self.health.timeout)
                if answer is not None:
                    details[state.plan.label] = answer
            if len(details) == len(self.workers):
                break
            await asyncio.sleep(0.1)
        lines = []
        for name, (host, port) in self.http.items():
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            detail = details.get(f"{name}:0", "") or name
            lines.append(f"ready: http://{shown}:{port} ({detail})")
        if not lines:
            services = {state.plan.service for state in self.workers}
            lines.append(f"ready: {len(self.workers)} worker(s) of {len(services)} service(s)")
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()

    async def _stop_all(self) -> None:
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = self.grace + 5.0
        waits = [asyncio.create_task(p.wait()) for p in live]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=deadline)
            if pending:
                log.warning(
                    "%d worker(s) did not exit in %.0f s; killing them", len(pending), deadline
                )
                for proc in live:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.gather(*pending, return_exceptions=True)

    def _env(self, state: WorkerState) -> dict[str, str]:
        plan = state.plan
        env = dict(self.base_env)
        env.update(plan.env)
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(plan.gpus, plan.peer_gpus)
        env["DYN_SERVICE_NAME"] = plan.service
        env["DYN_WORKER_INDEX"] = str(plan.index)
        env["DYN_HEALTH_PORT"] = str(state.health_port)
        if plan.service in self.http_sockets:
            env["DYN_HTTP_FD"] = str(self.http_sockets[plan.service])
        env["DYN_DRAIN_GRACE"] = str(self.grace)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def _spawn(self, state: WorkerState) -> asyncio.subprocess.Process:
        state.health_port = free_port()
        plan = state.plan
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dynamo_sdk.serve.host",
            "--graph",
            self.graph,
            "--service",
            plan.service,
            "--worker-index",
            str(plan.index),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env(state),
            cwd=self.cwd,
            pass_fds=[self.http_sockets[plan.service]] if plan.service in self.http_sockets else [],
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        state.proc = proc
        state.pids.append(proc.pid)
        gpus = f" on GPU(s) {','.join(map(str, plan.gpus))}" if plan.gpus else ""
        log.info(
            "started %s (pid %d)%s, health port %d", plan.label, proc.pid, gpus, state.health_port
        )
        return proc

    async def _relay(self, state: WorkerState, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        prefix = f"[{state.plan.label}] "
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\n")
            if text.strip():
                state.last_line = text
            self.out.write(prefix + text + "\n")
            self.out.flush()

    async def _watch_health(self, state: WorkerState, proc: asyncio.subprocess.Process) -> None:
        failures = 0
        seen_alive = False
        while proc.returncode is None and not self.stopping.is_set():
            await asyncio.sleep(self.health.interval)
            result = await probe_livez(state.health_port, self.health.timeout)
            if result is None and not seen_alive:
                continue  # still starting up: its health server is not listening yet
            if result:
                seen_alive, failures = True, 0
                continue
            failures += 1
            if failures >= self.health.failures_to_restart and not self.stopping.is_set():
                log.error(
                    "%s failed its liveness probe %d times; killing it", state.plan.label, failures
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return

    async def _supervise(self, state: WorkerState) -> None:
        backoff = self.restart.initial_backoff
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                proc = await self._spawn(state)
            except OSError as exc:
                log.error("cannot start %s: %s", state.plan.label, exc)
                self.request_stop()
                return
            relay = asyncio.create_task(self._relay(state, proc))
            health = asyncio.create_task(self._watch_health(state, proc))
            code = await proc.wait()
            health.cancel()
            _kill_leftovers(proc.pid)
            with contextlib.suppress(TimeoutError):  # the rest of its output, if any is left
                await asyncio.wait_for(asyncio.gather(relay, return_exceptions=True), 5.0)
            if self.stopping.is_set():
                log.info("%s exited with code %d", state.plan.label, code)
                return
            if code == EXIT_CONFIG:
                reason = state.last_line.split("cannot start: ", 1)[-1]
                log.error("%s cannot start as configured: %s", state.plan.label, reason)
                self.exit_code = 1
                self.request_stop()
                return
            if time.monotonic() - started >= self.restart.stable_after:
                backoff = self.restart.initial_backoff
            state.restarts += 1
            log.warning(
                "%s exited with code %d; restart #%d in %.1f s",
                state.plan.label,
                code,
                state.restarts,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, self.restart.max_backoff)


def _kill_leftovers(session: int) -> None:
    """Kill what an exited worker left running in its session (its process group).

    A worker killed hard (SIGKILL, the OOM killer) cannot stop its own children: vLLM's engine
    core and its model process live on as orphans, holding the model's memory and the worker's
    output pipe (so the relay would never see EOF and the worker would never be restarted).
    Each worker leads its own session, so its process group is exactly what it started.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signal.SIGKILL)
