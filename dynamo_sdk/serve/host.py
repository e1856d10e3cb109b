"""One worker process of one service: `python -m dynamo_sdk.serve.worker`.

The supervisor starts it with the graph, the service name and the worker index on the command
line, and the merged config, server addresses and GPU pinning in the environment. Start-up
order matters: connect, instantiate, run `@async_on_start`, subscribe the endpoints, and only
when readiness passes register them in etcd — a worker is never routed to before it is ready.
SIGTERM/SIGINT drains: leave discovery, finish (or after the grace period cancel) in-flight
streams, stop the HTTP servers, run `@async_on_shutdown`, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
from typing import Any

from fastapi import FastAPI

from dynamo_sdk.http.server import listen_socket, make_server
from dynamo_sdk.runtime import DistributedRuntime, DynamoError, RuntimeSettings
from dynamo_sdk.runtime.server import EndpointServer
from dynamo_sdk.sdk.config import ServiceConfig
from dynamo_sdk.sdk.context import dynamo_context
from dynamo_sdk.sdk.service import DynamoService
from dynamo_sdk.serve.api_routes import add_health_routes, bind_api_methods
from dynamo_sdk.serve.graph import GraphError, find_service, load_entry, resolve_graph

log = logging.getLogger("dynamo.worker")

HEALTH_PORT_ENV = "DYN_HEALTH_PORT"
DRAIN_GRACE_ENV = "DYN_DRAIN_GRACE"
DEFAULT_HTTP_PORT = 8000


class Worker:
    """Runs one instance of a service inside this process."""

    def __init__(self, service: DynamoService[Any], worker_index: int) -> None:
        self.service = service
        self.worker_index = worker_index
        self.config = ServiceConfig.get_instance()
        self.section = self.config.get(service.name, {})
        self.instance: Any = None
        self.runtime: DistributedRuntime | None = None
        self.servers: list[EndpointServer] = []
        self.http_tasks: list[asyncio.Task[None]] = []
        self.http_servers: list[Any] = []
        self.registered = False
        self.stop = asyncio.Event()

    async def _call_hooks(self, kind: str) -> list[Any]:
        results = []
        for name in self.service.hooks.get(kind, []):
            result = getattr(self.instance, name)()
            if inspect.isawaitable(result):
                result = await result
            results.append(result)
        return results

    async def _probe(self, kind: str) -> bool:
        """All hooks of `kind` pass (no hooks pass too); a hook that raises fails the probe."""
        try:
            return all(bool(r) for r in await self._call_hooks(kind))
        except Exception:
            log.exception("%s probe raised", kind)
            return False

    async def live(self) -> bool:
        return await self._probe("liveness")

    async def ready(self) -> bool:
        return self.registered and await self._probe("readiness")

    async def start(self) -> None:
        svc = self.service
        self.runtime = await DistributedRuntime.connect(RuntimeSettings.from_env())
        self.runtime.on_lease_lost(self.stop.set)
        dynamo_context.namespace = svc.namespace
        dynamo_context.component = svc.name
        dynamo_context.worker_index = self.worker_index
        dynamo_context.runtime = self.runtime
        self.instance = svc()
        await self._call_hooks("on_start")
        for spec in svc.endpoints.values():
            server = await self.runtime.serve_endpoint(
                svc.namespace,
                svc.name,
                spec.name,
                getattr(self.instance, spec.method_name),
                request_type=spec.request_type,
                streaming=spec.streaming,
                register=False,
            )
            self.servers.append(server)
        await self._start_http()
        while not await self._probe("readiness"):
            if self.stop.is_set():
                return
            await asyncio.sleep(0.5)
        for server in self.servers:
            await self.runtime.register(server, {"worker_index": self.worker_index})
        self.registered = True
        log.info(
            "ready: instance %x, endpoints [%s]%s",
            self.runtime.instance_id,
            ", ".join(svc.endpoints) or "-",
            f", http port {self._api_port()}" if svc.apis else "",
        )

    def _api_port(self) -> int:
        return int(self.section.get("port", DEFAULT_HTTP_PORT))

    async def _start_http(self) -> None:
        apps: list[tuple[FastAPI, socket.socket]] = []
        if self.service.apis:
            app = FastAPI(title=self.service.name)
            bind_api_methods(app, self.instance, self.service.apis)
            add_health_routes(app, self.live, self.ready)
            host = str(self.section.get("host", "0.0.0.0"))
            apps.append((app, listen_socket(host, self._api_port())))
        health_port = os.environ.get(HEALTH_PORT_ENV)
        if health_port:
            app = FastAPI(title=f"{self.service.name} health")
            add_health_routes(app, self.live, self.ready)
            apps.append((app, listen_socket("127.0.0.1", int(health_port))))
        for app, sock in apps:
            server = make_server(app, sock.getsockname()[0], sock.getsockname()[1])
            self.http_servers.append(server)
            self.http_tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        for server in self.http_servers:
            while not server.started:
                for task in self.http_tasks:
                    if task.done():
                        task.result()  # re-raise a bind or start-up failure
                await asyncio.sleep(0.01)

    async def drain(self, grace: float) -> None:
        assert self.runtime is not None
        self.registered = False
        cancelled = await self.runtime.drain(grace)
        if cancelled:
            log.warning(
                "drain: cancelled %d stream(s) still running after %.1f s", cancelled, grace
            )
        for server in self.http_servers:
            server.should_exit = True
        if self.http_tasks:
            await asyncio.wait(self.http_tasks, timeout=grace)
        with contextlib.suppress(Exception):
            await self._call_hooks("on_shutdown")
        await self.runtime.shutdown()


async def run_worker(graph: str, service_name: str, worker_index: int) -> int:
    entry = load_entry(graph)
    service = find_service(resolve_graph(entry), service_name)
    worker = Worker(service, worker_index)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop.set)
    grace = float(os.environ.get(DRAIN_GRACE_ENV, "10"))
    start = asyncio.create_task(worker.start())
    stopper = asyncio.create_task(worker.stop.wait())
    await asyncio.wait([start, stopper], return_when=asyncio.FIRST_COMPLETED)
    if start.done() and start.exception() is not None:
        stopper.cancel()
        raise start.exception()  # type: ignore[misc]
    await worker.stop.wait()
    if not start.done():
        start.cancel()
        with contextlib.suppress(BaseException):
            await start
    log.info("draining (grace %.1f s)", grace)
    if worker.runtime is not None:
        await worker.drain(grace)
    if worker.runtime is not None and worker.runtime.lease_lost.is_set():
        log.error("exiting: the etcd lease was lost")
        return 3
    log.info("stopped")
    return 0


def _run(coro: Any) -> int:
    """Run on uvloop where available (the event loop every Dynamo process uses)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one worker of one Dynamo service.")
    parser.add_argument("--graph", required=True, help="module.path:Entry")
    parser.add_argument("--service", required=True)
    parser.add_argument("--worker-index", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("DYN_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = _run(run_worker(args.graph, args.service, args.worker_index))
    except (DynamoError, GraphError, ValueError, OSError) as exc:
        log.error("worker failed: %s: %s", type(exc).__name__, exc)
        code = 1
    except Exception:
        log.exception("worker failed")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
