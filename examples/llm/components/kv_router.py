"""Router: picks the Worker for each request from KV overlap and load (dynamo_sdk.llm.kv.router).

It listens to every Worker's KV events and load metrics on NATS, keeps the global prefix index,
drops workers whose etcd lease ended, and answers `route(token_ids)` with a worker instance id;
the Processor then calls that worker directly. `mode` is `kv`, `round_robin` or `random`.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from prometheus_client import Counter, Histogram

from dynamo_sdk import ServiceConfig, async_on_start, dynamo_context, endpoint, service
from dynamo_sdk.llm.errors import ServiceUnavailableError
from dynamo_sdk.llm.kv.events import (
    decode_batch,
    decode_load,
    kv_events_subject,
    load_metrics_subject,
)
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig
from dynamo_sdk.runtime.discovery import InstanceWatcher
from examples.llm.components.worker import Worker

log = logging.getLogger("dynamo.llm.router")

DECISIONS = Counter("dynamo_router_decisions", "Routing decisions", ["worker"])
OVERLAP = Histogram(
    "dynamo_router_overlap_ratio",
    "Fraction of the prompt's blocks the chosen worker already held",
    buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
)


class RouteRequest(msgspec.Struct):
    token_ids: list[int]
    request_id: str = ""


class RouteDecision(msgspec.Struct):
    worker_id: int
    overlap_blocks: int
    prompt_blocks: int


class RouterState(msgspec.Struct):
    mode: str
    workers: dict[str, int]  # instance id (hex) -> indexed blocks
    indexed_blocks: int


@service(dynamo={"namespace": "dynamo"})
class Router:
    def __init__(self) -> None:
        cfg: dict[str, Any] = ServiceConfig.get_instance().for_service("Router")
        self.config = RouterConfig(
            mode=cfg.get("mode", "kv"),
            block_size=int(cfg.get("block_size", 16)),
            overlap_weight=float(cfg.get("overlap_weight", 1.0)),
            temperature=float(cfg.get("temperature", 0.0)),
        )
        self.router = KvRouter(self.config)
        self.workers: InstanceWatcher | None = None
        self._gone: dict[int, None] = {}  # workers whose lease ended (insertion-ordered, bounded)

    @async_on_start
    async def start(self) -> None:
        runtime = dynamo_context.runtime
        assert runtime is not None
        self.workers = runtime.watcher(Worker.namespace, Worker.name, "generate")
        self.workers.on_removed(self._worker_gone)
        nc = runtime.nc
        await nc.subscribe(kv_events_subject(Worker.namespace, Worker.name), cb=self._on_events)
        await nc.subscribe(load_metrics_subject(Worker.namespace, Worker.name), cb=self._on_load)
        log.info("routing mode %s, block size %d", self.config.mode, self.config.block_size)

    def _worker_gone(self, worker_id: int) -> None:
        self._gone[worker_id] = None
        while len(self._gone) > 10_000:
            del self._gone[next(iter(self._gone))]
        log.info(
            "worker %x left: dropping its %d indexed blocks",
            worker_id,
            self.router.indexer.blocks_of(worker_id),
        )
        self.router.remove_worker(worker_id)

    async def _on_events(self, msg: Any) -> None:
        try:
            batch = decode_batch(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("bad KV event batch: %s", exc)
            return
        if batch.worker_id in self._gone:
            return  # a late batch from a dead worker must not bring its blocks back
        # A worker not (yet) in discovery is accepted: its first events can overtake the etcd
        # watch that announces it, and dropping them would lose its prompt blocks for good.
        self.router.indexer.apply(batch)

    async def _on_load(self, msg: Any) -> None:
        try:
            self.router.update_load(decode_load(msg.data))
        except msgspec.DecodeError:
            pass

    @endpoint()
    async def route(self, request: RouteRequest) -> RouteDecision:
        assert self.workers is not None
        workers = list(self.workers.instances)
        if not workers:
            raise ServiceUnavailableError("no live Worker to route to")
        decision = self.router.choose(request.token_ids, workers, request.request_id or None)
        DECISIONS.labels(f"{decision.worker_id:x}").inc()
        if decision.prompt_blocks:
            OVERLAP.observe(decision.overlap_blocks / decision.prompt_blocks)
        log.debug(
            "request %s -> worker %x (overlap %d/%d blocks)",
            request.request_id,
            decision.worker_id,
            decision.overlap_blocks,
            decision.prompt_blocks,
        )
        return RouteDecision(decision.worker_id, decision.overlap_blocks, decision.prompt_blocks)

    @endpoint()
    async def release(self, request_id: str) -> bool:
        """The caller's stream for `request_id` ended: it no longer loads its worker."""
        self.router.release(request_id)
        return True

    @endpoint()
    async def state(self, _: str) -> RouterState:
        indexer = self.router.indexer
        workers = {f"{w:x}": indexer.blocks_of(w) for w in indexer.workers()}
        return RouterState(self.config.mode, workers, indexer.num_blocks())
