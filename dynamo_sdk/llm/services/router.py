"""Router: KV-aware routing as a service of its own (`router_mode: service` elsewhere).

It follows every Worker's KV events and load (`dynamo_sdk/llm/kv/feed.py`), keeps the global
prefix index, and answers `route(token_ids)` with the worker instance that should serve the
request (`dynamo_sdk/llm/kv/router.py` weighs cached overlap against load); the caller then
calls that worker directly and `release`s the assignment when its stream ends. The Frontend
and the Processor can make the same choice in their own process (`router_mode: kv`), which
saves this service's round trips; the service is for graphs that scale routing on its own.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import msgspec
from msgspec import Meta
from prometheus_client import Counter, Histogram

from dynamo_sdk import (
    async_on_shutdown,
    async_on_start,
    depends,
    dynamo_context,
    endpoint,
    service,
    service_of,
)
from dynamo_sdk.llm.errors import ServiceUnavailableError
from dynamo_sdk.llm.kv.feed import KvFeed
from dynamo_sdk.llm.kv.indexer import NO_OVERLAP
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig
from dynamo_sdk.llm.routing import RouteDecision, RouteRequest, RouterState, state_of
from dynamo_sdk.llm.services.worker import Worker
from dynamo_sdk.runtime.discovery import InstanceWatcher

log = logging.getLogger("dynamo.llm.router")

DECISIONS = Counter("dynamo_router_decisions", "Routing decisions", ["worker"])
OVERLAP = Histogram(
    "dynamo_router_overlap_ratio",
    "Fraction of the prompt's blocks the chosen worker already held",
    buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
)


class RouterServiceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mode: Annotated[Literal["kv", "round_robin", "random"], Meta(description="the choice")] = "kv"
    block_size: Annotated[int, Meta(ge=1, description="the workers' KV block size")] = 16
    overlap_weight: Annotated[float, Meta(ge=0.0, description="prefill blocks vs load")] = 1.0
    temperature: Annotated[float, Meta(ge=0.0, description="0: the cheapest worker")] = 0.0
    # a prompt block in a tier below the GPU, credited next to a GPU hit (1.0): kv/router.py
    host_weight: Annotated[
        float, Meta(ge=0.0, le=1.0, description="credit of a block in host memory")
    ] = 0.75
    disk_weight: Annotated[
        float, Meta(ge=0.0, le=1.0, description="credit of a block on a worker's disk")
    ] = 0.25
    shared_weight: Annotated[
        float, Meta(ge=0.0, le=1.0, description="credit of a block in shared storage")
    ] = 0.25
    tier_aware: Annotated[
        bool, Meta(description="credit host/disk/shared blocks (false: GPU hits only)")
    ] = True


@service(dynamo={"namespace": "dynamo"}, config=RouterServiceConfig)
class Router:
    worker = depends(Worker)  # whose instances it routes to

    def __init__(self) -> None:
        cfg: RouterServiceConfig = service_of(Router).load_config()
        self.config = RouterConfig(
            mode=cfg.mode,
            block_size=cfg.block_size,
            overlap_weight=cfg.overlap_weight,
            temperature=cfg.temperature,
            host_weight=cfg.host_weight,
            disk_weight=cfg.disk_weight,
            shared_weight=cfg.shared_weight,
            tier_aware=cfg.tier_aware,
        )
        self.router = KvRouter(self.config)
        self.workers: InstanceWatcher | None = None
        self.feed: KvFeed | None = None

    @async_on_start
    async def start(self) -> None:
        runtime = dynamo_context.runtime
        assert runtime is not None
        self.workers = runtime.watcher(
            service_of(Worker).namespace, service_of(Worker).name, "generate"
        )
        self.feed = KvFeed(
            self.router, runtime, service_of(Worker).namespace, service_of(Worker).name
        )
        await self.feed.start(self.workers)
        c = self.config
        tiers = (f"tier credit host {c.host_weight:g}, disk {c.disk_weight:g}, shared "
                 f"{c.shared_weight:g}" if c.tier_aware else "GPU hits only")  # fmt: skip
        log.info("routing mode %s, block size %d, %s", c.mode, c.block_size, tiers)

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
        tiers = decision.tiers or NO_OVERLAP
        log.debug("request %s -> worker %x (overlap %d/%d blocks on GPU, %d host, %d disk, "
                  "%d shared)", request.request_id, decision.worker_id, decision.overlap_blocks,
                  decision.prompt_blocks, tiers.host, tiers.disk, tiers.shared)  # fmt: skip
        return RouteDecision(
            decision.worker_id,
            decision.overlap_blocks,
            decision.prompt_blocks,
            tiers.host,
            tiers.disk,
            tiers.shared,
        )

    @endpoint()
    async def release(self, request_id: str) -> bool:
        """The caller's stream for `request_id` ended: it no longer loads its worker."""
        self.router.release(request_id)
        return True

    @endpoint()
    async def state(self, _: str) -> RouterState:
        return state_of(self.router)

    @async_on_shutdown
    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()
