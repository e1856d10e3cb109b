"""From `dynamo serve` arguments to a plan: which processes, with which config and GPUs.

Everything here is pure (no servers, no processes), so `--dry-run` and the tests see exactly
what the supervisor would start. Every service's section is decoded into its config type
here, so a bad key fails the command before any worker starts; the decoded settings also
decide which of the graph's conditional edges are active, and only the services the entry
reaches over those are planned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dynamo_sdk.sdk.service import DynamoService, ServiceOptions
from dynamo_sdk.serve.config_loader import (
    ConfigError,
    apply_service_args,
    load_yaml,
    merge_config,
    parse_overrides,
)
from dynamo_sdk.serve.gpus import allocate, cuda_visible_devices, detect_gpus
from dynamo_sdk.serve.graph import load_entry, resolve_graph, services_defined_in
from dynamo_sdk.serve.supervisor import WorkerPlan

# Loopback unless a service's `host` says otherwise: a graph is reachable from other hosts only
# when someone asked for it (`--Frontend.host=0.0.0.0`).
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
SECRET_KEYS = ("api_key",)  # never printed (`render`)


@dataclass
class GraphPlan:
    graph: str
    cwd: str
    services: list[DynamoService[Any]]
    options: dict[str, ServiceOptions]
    config: dict[str, dict[str, Any]]
    workers: list[WorkerPlan]
    gpus_seen: list[int]
    settings: dict[str, Any] = field(default_factory=dict)  # decoded sections, by service

    def config_json(self) -> str:
        return json.dumps(self.config)

    def http_services(self) -> dict[str, tuple[str, int]]:
        """(host, port) of every planned service that listens on HTTP: its section's keys,
        or its config type's defaults for them (the Frontend's `host` default is the one
        its socket is bound with, whatever `DEFAULT_HTTP_HOST` says)."""
        return {svc.name: http_address(self._http_section(svc.name))
                for svc in self.services if svc.serves_http}  # fmt: skip

    def _http_section(self, name: str) -> dict[str, Any]:
        section = dict(self.config.get(name, {}))
        decoded = self.settings.get(name)
        for key in ("host", "port"):
            value = getattr(decoded, key, None)
            if key not in section and value is not None:
                section[key] = value
        return section


def http_address(section: dict[str, Any]) -> tuple[str, int]:
    """Where a service's HTTP server listens: its `host` and `port` keys."""
    host = section.get("host", DEFAULT_HTTP_HOST)
    port = section.get("port", DEFAULT_HTTP_PORT)
    if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"bad HTTP address host={host!r} port={port!r}")
    return host, port


def build_plan(
    graph: str,
    *,
    config_file: str | None,
    override_args: list[str],
    cwd: str | None = None,
    environ: dict[str, str] | None = None,
) -> GraphPlan:
    """Import the graph, merge its config, size it, and pin its workers to GPUs."""
    cwd = os.path.abspath(cwd or os.getcwd())
    entry = load_entry(graph, cwd)
    every = resolve_graph(entry)  # over every edge that could be active
    raw = load_yaml(config_file) if config_file else {}
    reachable = {svc.name for svc in every}
    elsewhere = [name for name in services_defined_in(graph) if name not in reachable]
    merged = merge_config(every, raw, parse_overrides(override_args), known_elsewhere=elsewhere)
    settings = {svc.name: svc.decode_config(merged.get(svc.name, {})) for svc in every}
    services = resolve_graph(entry, settings)
    options = {svc.name: apply_service_args(svc, merged.get(svc.name, {})) for svc in services}
    gpus = detect_gpus(environ)
    # Leaves first: a service's dependencies are up (or coming up) before it takes traffic.
    ordered = list(reversed(services))
    requests = [
        (svc.name, index, options[svc.name].gpus)
        for svc in ordered
        for index in range(options[svc.name].workers)
    ]
    allocation = allocate(requests, gpus)
    workers = [
        WorkerPlan(
            service=name,
            index=index,
            gpus=allocation[(name, index)],
            env=dict(options[name].extra.get("envs", {})),
            peer_gpus=_peers(allocation, (name, index)) if options[name].peer_gpus else [],
        )
        for name, index, _ in requests
    ]
    plan = GraphPlan(graph, cwd, services, options, merged, workers, gpus, settings)
    plan.http_services()  # a bad host/port is a config error now, not a worker's later
    return plan


def _peers(allocation: dict[tuple[str, int], list[int]], me: tuple[str, int]) -> list[int]:
    """Every GPU given to another worker of the graph, in allocation order."""
    return [gpu for key, ids in allocation.items() if key != me for gpu in ids]


def render(plan: GraphPlan) -> str:
    """The human-readable graph that `dynamo serve --dry-run` prints."""
    lines = [f"graph: {plan.graph}  (working dir {plan.cwd})"]
    lines.append(f"GPUs visible: {','.join(map(str, plan.gpus_seen)) or 'none'}")
    for svc in plan.services:
        opts = plan.options[svc.name]
        deps = ", ".join(dep.name for dep in svc.edges(plan.settings[svc.name])) or "-"
        lines.append(f"- {svc.name}  (namespace {opts.namespace})")
        lines.append(f"    workers: {opts.workers}   gpus per worker: {opts.gpus}")
        lines.append(f"    endpoints: {', '.join(svc.endpoints) or '-'}")
        if svc.apis:
            routes = ", ".join(f"{'/'.join(a.methods)} {a.path}" for a in svc.apis)
            lines.append(f"    http: {routes}")
        lines.append(f"    depends on: {deps}")
        for worker in plan.workers:
            if worker.service == svc.name and worker.gpus:
                visible = cuda_visible_devices(worker.gpus, worker.peer_gpus)
                own = f"   (own: {len(worker.gpus)})" if worker.peer_gpus else ""
                lines.append(f"    worker {worker.index}: CUDA_VISIBLE_DEVICES={visible}{own}")
        settings = msgspec.to_builtins(plan.settings[svc.name])
        if isinstance(settings, dict):
            for key in SECRET_KEYS:
                if settings.get(key):
                    settings[key] = "***"
        lines.append(f"    config: {json.dumps(settings, sort_keys=True, default=str)}")
    left_out = [name for name in plan.settings if name not in {s.name for s in plan.services}]
    if left_out:
        lines.append(f"not started (no active edge reaches them): {', '.join(left_out)}")
    return "\n".join(lines)
