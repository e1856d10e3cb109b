"""Run a planned graph: find or start NATS/etcd, then hand the workers to the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from dynamo_sdk.http.server import PortInUseError, listen_socket
from dynamo_sdk.runtime.security import GRAPH_SECRET_ENV, new_graph_secret, redact
from dynamo_sdk.sdk.config import CONFIG_ENV
from dynamo_sdk.serve.config_loader import ConfigError
from dynamo_sdk.serve.embedded import EmbeddedServers, configured_servers, start_embedded
from dynamo_sdk.serve.plan import GraphPlan
from dynamo_sdk.serve.supervisor import Supervisor

log = logging.getLogger("dynamo.serve")


def _run_loop(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def worker_env(plan: GraphPlan, server_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(server_env)
    env[CONFIG_ENV] = plan.config_json()
    # Workers import the graph module from the working directory, like the supervisor did.
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = plan.cwd + (os.pathsep + path if path else "")
    return env


def with_graph_secret(
    server_env: dict[str, str], *, joining: bool, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """``server_env`` plus a generated `GRAPH_SECRET_ENV` unless the environment sets one.

    The response plane's peers prove it to each other, so only this graph's processes (which
    inherit it) can write streams to its callers.
    """
    env = os.environ if environ is None else environ
    if env.get(GRAPH_SECRET_ENV, "").strip():
        return server_env
    if joining:
        log.info("%s is unset: this host's processes share a generated one (set the same value "
                 "on every host of the graph to stream responses between hosts over TCP; "
                 "without it they answer each other over NATS)", GRAPH_SECRET_ENV)  # fmt: skip
    return {**server_env, GRAPH_SECRET_ENV: new_graph_secret()}


def bind_http(plan: GraphPlan) -> dict[str, socket.socket]:
    """Each HTTP service's listening socket, bound before anything starts (a taken port fails
    the command, naming the port and the service); its workers inherit it."""
    sockets: dict[str, socket.socket] = {}
    try:
        for name, (host, port) in plan.http_services().items():
            try:
                sockets[name] = listen_socket(host, port)
            except PortInUseError:
                raise ConfigError(
                    f"port {port} ({name}) is already in use: stop what holds it or choose "
                    f"another with --{name}.port=N"
                ) from None
            sockets[name].set_inheritable(True)
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


async def _supervise(supervisor: Supervisor, embedded: EmbeddedServers | None) -> int:
    """The supervisor's run, with the embedded servers watched (restarted if they exit)."""
    if embedded is None:
        return await supervisor.run()
    watch = asyncio.create_task(embedded.watch())
    try:
        return await supervisor.run()
    finally:
        watch.cancel()
        with contextlib.suppress(BaseException):
            await watch


def serve_graph(plan: GraphPlan, *, grace: float = 10.0) -> int:
    """Serve until SIGINT/SIGTERM (or a worker that cannot start); the process exit code."""
    sockets = bind_http(plan)
    servers = configured_servers()
    embedded = None
    if servers is None:
        embedded = start_embedded()
        servers = embedded.env()
        log.info(
            "embedded servers: nats-server %s, etcd %s (data in %s; credentials generated)",
            redact(embedded.nats.url),
            redact(embedded.etcd.url),
            embedded.workdir,
        )
    else:
        log.info("joining NATS %s, etcd %s", redact(servers["NATS_SERVER"]),
                 redact(servers["ETCD_ENDPOINTS"]))  # fmt: skip
    servers = with_graph_secret(servers, joining=embedded is None)
    try:
        supervisor = Supervisor(
            plan.graph,
            plan.workers,
            base_env=worker_env(plan, servers),
            cwd=plan.cwd,
            grace=grace,
            http=plan.http_services(),
            http_sockets={name: sock.fileno() for name, sock in sockets.items()},
        )
        return _run_loop(_supervise(supervisor, embedded))
    finally:
        for sock in sockets.values():
            sock.close()
        if embedded is not None:
            embedded.stop()
