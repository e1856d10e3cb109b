"""One worker process of one service: `python -m dynamo_sdk.serve.host`.

The supervisor starts it with the graph, the service name and the worker index on the command
line, and the merged config, server addresses and GPU pinning in the environment. Start-up
order matters: connect, instantiate, run `@async_on_start`, subscribe the endpoints, start the
HTTP server (its `@api` routes or its `@http_app`), and only when readiness passes register the
endpoints in etcd: a worker is never routed to before it is ready. SIGTERM/SIGINT drains:
leave discovery, finish (or after the grace period cancel) in-flight streams, stop the HTTP
servers, run `@async_on_shutdown`, exit 0.

A worker that cannot start as configured (a `ConfigurationError`: a bad setting, a missing
model, a taken port) says so in one line and exits with `EXIT_CONFIG`, which tells the
supervisor to stop the graph rather than restart it into the same failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
import socket
import sys
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette

from dynamo_sdk.http.server import PortInUseError, inherited_socket, listen_socket, make_server
from dynamo_sdk.runtime import DistributedRuntime, DynamoError, RuntimeSettings
from dynamo_sdk.runtime.server import EndpointServer
from dynamo_sdk.sdk.config import ServiceConfig
from dynamo_sdk.sdk.context import dynamo_context
from dynamo_sdk.sdk.errors import EXIT_CONFIG, ConfigurationError
from dynamo_sdk.sdk.service import DynamoService
from dynamo_sdk.serve.api_routes import Readiness, add_health_routes, bind_api_methods
from dynamo_sdk.serve.graph import find_service, load_entry, resolve_graph
from dynamo_sdk.serve.plan import http_address

log = logging.getLogger("dynamo.worker")

HEALTH_PORT_ENV = "DYN_HEALTH_PORT"
DRAIN_GRACE_ENV = "DYN_DRAIN_GRACE"
HTTP_FD_ENV = "DYN_HTTP_FD"  # the service's listening socket, bound by the supervisor


class ServiceHost:
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

    async def _probe(self, kind: str) -> Readiness:
        """All hooks of `kind` pass (no hooks pass too); a hook that raises fails the probe.

        A hook passes with a true value; a string that passes also says what is ready.
        """
        try:
            results = await self._call_hooks(kind)
        except Exception:
            log.exception("%s probe raised", kind)
            return False, ""
        detail = "; ".join(r for r in results if isinstance(r, str) and r)
        return all(bool(r) for r in results), detail

    async def live(self) -> bool:
        return (await self._probe("liveness"))[0]

    async def ready(self) -> Readiness:
        if not self.registered:
            return False, ""
        return await self._probe("readiness")

    async def start(self) -> None:
        svc = self.service
        # A lost etcd lease does not stop the worker: the runtime re-grants it and registers
        # again (`DistributedRuntime._regrant`); requests over NATS go on meanwhile.
        self.runtime = await DistributedRuntime.connect(RuntimeSettings.from_env())
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
        while not (await self._probe("readiness"))[0]:
            if self.stop.is_set():
                return
            await asyncio.sleep(0.25)
        # What start-up made (modules, the service's state, an engine's tables) lives as long
        # as the process: out of the cyclic GC's reach, it is not rescanned by every
        # collection the requests' garbage triggers (fewer and shorter pauses under load).
        gc.collect()
        gc.freeze()
        for server in self.servers:
            await self.runtime.register(server, {"worker_index": self.worker_index})
        self.registered = True
        http = f", http port {http_address(self.section)[1]}" if svc.serves_http else ""
        log.info(
            "ready: instance %x, endpoints [%s]%s",
            self.runtime.instance_id,
            ", ".join(svc.endpoints) or "-",
            http,
        )

    async def _service_app(self) -> Starlette | None:
        """The service's HTTP app: its `@http_app`, or one made of its `@api` routes."""
        if self.service.apis:
            app = FastAPI(title=self.service.name)
            bind_api_methods(app, self.instance, self.service.apis)
            add_health_routes(app, self.live, self.ready)
            return app
        made = await self._call_hooks("http_app")
        if not made:
            return None
        app = made[0]
        if not isinstance(app, Starlette):
            raise ConfigurationError(
                f"{self.service.name}: @http_app must return a Starlette/FastAPI app, "
                f"got {type(app).__name__}"
            )
        add_health_routes(app, self.live, self.ready, metrics=False)
        return app

    async def _start_http(self) -> None:
        apps: list[tuple[Starlette, socket.socket]] = []
        app = await self._service_app()
        if app is not None:
            inherited = os.environ.get(HTTP_FD_ENV)
            if inherited:  # every worker of the service accepts on the one socket
                sock = inherited_socket(int(inherited))
            else:
                host, port = http_address(self.section)
                try:
                    sock = listen_socket(host, port)
                except PortInUseError:
                    raise ConfigurationError(
                        f"port {port} ({self.service.name}) is already in use: stop what holds "
                        f"it or choose another with --{self.service.name}.port=N"
                    ) from None
            apps.append((app, sock))
        health_port = os.environ.get(HEALTH_PORT_ENV)
        if health_port:
            health = FastAPI(title=f"{self.service.name} health")
            add_health_routes(health, self.live, self.ready)
            apps.append((health, listen_socket("127.0.0.1", int(health_port))))
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
        """Leave discovery and stop, all within `grace` seconds: in-flight streams get the
        grace less what the shutdown hooks reserved (`dynamo_context.shutdown_reserve`)."""
        assert self.runtime is not None
        loop = asyncio.get_running_loop()
        reserve = min(max(dynamo_context.shutdown_reserve, 0.0), grace)
        streams_until = loop.time() + grace - reserve
        self.registered = False
        cancelled = await self.runtime.drain(grace - reserve)
        if cancelled:
            log.warning("drain: cancelled %d stream(s) still running after %.1f s", cancelled,
                        grace - reserve)  # fmt: skip
        for server in self.http_servers:
            server.should_exit = True
        if self.http_tasks:
            await asyncio.wait(self.http_tasks, timeout=max(streams_until - loop.time(), 0.1))
        with contextlib.suppress(Exception):
            await self._call_hooks("on_shutdown")
        await self.runtime.shutdown()


async def run_worker(graph: str, service_name: str, worker_index: int) -> int:
    entry = load_entry(graph)
    service = find_service(resolve_graph(entry), service_name)
    host = ServiceHost(service, worker_index)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, host.stop.set)
    grace = float(os.environ.get(DRAIN_GRACE_ENV, "10"))
    start = asyncio.create_task(host.start())
    stopper = asyncio.create_task(host.stop.wait())
    await asyncio.wait([start, stopper], return_when=asyncio.FIRST_COMPLETED)
    if start.done() and start.exception() is not None:
        stopper.cancel()
        failure = start.exception()
        if host.runtime is not None:
            # leave discovery and stop the HTTP servers before reporting: a half-started
            # worker must not stay registered (or hold its port) while it exits
            with contextlib.suppress(Exception):
                await host.drain(0.0)
        raise failure  # type: ignore[misc]
    await host.stop.wait()
    if not start.done():
        start.cancel()
        with contextlib.suppress(BaseException):
            await start
    log.info("draining (grace %.1f s)", grace)
    if host.runtime is not None:
        await host.drain(grace)
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
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        code = EXIT_CONFIG
    except (DynamoError, ValueError, OSError) as exc:
        log.error("worker failed: %s: %s", type(exc).__name__, exc)
        code = 1
    except Exception:
        log.exception("worker failed")
        code = 1
    # Everything is shut down: spare the interpreter's final collection over every object
    # torch, vLLM and the rest made (1.5-2.5 s on 2 cores, 0.15 s frozen), which would eat
    # into the supervisor's kill deadline.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()
