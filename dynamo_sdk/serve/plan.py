"""From `dynamo serve` arguments to a plan: which processes, with which config and GPUs.

Everything here is pure (no servers, no processes), so `--dry-run` and the tests see exactly
what the supervisor would start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from dynamo_sdk.sdk.service import DynamoService, ServiceOptions
from dynamo_sdk.serve.config_loader import (
    apply_service_args,
    load_yaml,
    merge_config,
    parse_overrides,
)
from dynamo_sdk.serve.gpus import allocate, cuda_visible_devices, detect_gpus
from dynamo_sdk.serve.graph import load_entry, resolve_graph, services_defined_in
from dynamo_sdk.serve.supervisor import WorkerPlan


@dataclass
class GraphPlan:
    graph: str
    cwd: str
    services: list[DynamoService[Any]]
    options: dict[str, ServiceOptions]
    config: dict[str, dict[str, Any]]
    workers: list[WorkerPlan]
    gpus_seen: list[int]

    def config_json(self) -> str:
        return json.dumps(self.config)


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
    services = resolve_graph(entry)
    raw = load_yaml(config_file) if config_file else {}
    started = {svc.name for svc in services}
    elsewhere = [name for name in services_defined_in(graph) if name not in started]
    merged = merge_config(services, raw, parse_overrides(override_args), known_elsewhere=elsewhere)
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
    return GraphPlan(graph, cwd, services, options, merged, workers, gpus)


def _peers(allocation: dict[tuple[str, int], list[int]], me: tuple[str, int]) -> list[int]:
    """Every GPU given to another worker of the graph, in allocation order."""
    return [gpu for key, ids in allocation.items() if key != me for gpu in ids]


def render(plan: GraphPlan) -> str:
    """The human-readable graph that `dynamo serve --dry-run` prints."""
    lines = [f"graph: {plan.graph}  (working dir {plan.cwd})"]
    lines.append(f"GPUs visible: {','.join(map(str, plan.gpus_seen)) or 'none'}")
    for svc in plan.services:
        opts = plan.options[svc.name]
        deps = ", ".join(dep.name for dep in svc.edges()) or "-"
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
        section = plan.config.get(svc.name, {})
        lines.append(f"    config: {json.dumps(section, sort_keys=True)}")
    return "\n".join(lines)
