"""Run a planned graph: find or start NATS/etcd, then hand the workers to the supervisor."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from dynamo_sdk.sdk.config import CONFIG_ENV
from dynamo_sdk.serve.embedded import configured_servers, start_embedded
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


def serve_graph(plan: GraphPlan, *, grace: float = 10.0) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    servers = configured_servers()
    embedded = None
    if servers is None:
        embedded = start_embedded()
        servers = embedded.env()
        log.info(
            "embedded servers: nats-server %s, etcd %s (data in %s)",
            embedded.nats.url,
            embedded.etcd.url,
            embedded.workdir,
        )
    else:
        log.info("joining NATS %s, etcd %s", servers["NATS_SERVER"], servers["ETCD_ENDPOINTS"])
    try:
        supervisor = Supervisor(
            plan.graph, plan.workers, base_env=worker_env(plan, servers), cwd=plan.cwd, grace=grace
        )
        return _run_loop(supervisor.run())
    finally:
        if embedded is not None:
            embedded.stop()
