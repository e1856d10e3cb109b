"""Which worker instance serves a request, and the call to it.

`RoutingConfig.mode`:

* `round_robin` / `random`: spread over the live instances of the model's endpoint;
* `kv`: the KV-aware choice (`kv/router.py`: cached prefix overlap against load), from the
  workers' KV events and load followed in this process (`kv/feed.py`); needs workers that
  publish KV events (otherwise round robin, said once in the log). Blocks a worker keeps in
  host memory, on disk or in shared storage count for less than GPU hits (`kv_tier_*`);
* `service`: ask the Router service (`route`, then `release` when the stream ends): one more
  round trip per request, for graphs that scale the Router out on its own.

Every mode ends in `EndpointClient.direct`: one call from here to the chosen engine.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from dynamo_sdk.llm.kv.events import Tier
from dynamo_sdk.llm.kv.feed import KvFeed
from dynamo_sdk.llm.kv.router import KvRouter, RouterConfig
from dynamo_sdk.llm.protocol import EngineOutput, ModelEntry, PreprocessedRequest, merge_outputs
from dynamo_sdk.runtime import DistributedRuntime, EndpointClient, ResponseStream

log = logging.getLogger("dynamo.llm.routing")

RoutingMode = Literal["round_robin", "random", "kv", "service"]


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How a Frontend or Processor picks the worker instance of each request."""

    router_mode: Annotated[
        RoutingMode, Meta(description="round_robin | random | kv | service (the Router service)")
    ] = "round_robin"
    kv_overlap_weight: Annotated[
        float, Meta(ge=0.0, description="kv: weight of blocks to prefill against load")
    ] = 1.0
    router_temperature: Annotated[
        float, Meta(ge=0.0, description="kv: 0 picks the cheapest; higher samples more widely")
    ] = 0.0
    # What a cached prompt block in a tier below the GPU is worth next to one on the GPU (1.0):
    # loading it is cheaper than computing it, dearer than having it (`kv/router.py`).
    kv_tier_host_weight: Annotated[
        float, Meta(ge=0.0, le=1.0, description="kv: credit of a block in host memory (PCIe copy)")
    ] = 0.75
    kv_tier_disk_weight: Annotated[
        float, Meta(ge=0.0, le=1.0, description="kv: credit of a block on the worker's disk")
    ] = 0.25
    kv_tier_shared_weight: Annotated[
        float, Meta(ge=0.0, le=1.0, description="kv: credit of a block in shared storage")
    ] = 0.25
    kv_tier_aware: Annotated[
        bool, Meta(description="kv: credit host/disk/shared blocks (false: GPU hits only)")
    ] = True
    migration_limit: Annotated[
        int,
        Meta(ge=0, le=100, description="streams whose worker died go on on another: times"),
    ] = 3


class RouteRequest(msgspec.Struct):
    token_ids: list[int]
    request_id: str = ""


class RouteDecision(msgspec.Struct):
    """The Router service's answer. ``overlap_blocks``: prompt blocks already on the worker's
    GPU; the ``*_blocks`` after it: those it would load from a lower tier (0 from a router
    that does not know tiers: the fields are optional on the wire)."""

    worker_id: int
    overlap_blocks: int
    prompt_blocks: int
    host_blocks: int = 0
    disk_blocks: int = 0
    shared_blocks: int = 0


class RouterState(msgspec.Struct):
    """What a KV-aware router knows (for operators and tests)."""

    mode: str
    workers: dict[str, int]  # instance id (hex) -> indexed blocks on its GPU
    indexed_blocks: int  # distinct blocks on some worker's GPU
    tier_blocks: dict[str, int] = {}  # "host" / "disk" / "shared" -> distinct blocks there


def state_of(router: KvRouter) -> RouterState:
    indexer = router.indexer
    workers = {f"{w:x}": indexer.blocks_of(w) for w in indexer.workers()}
    tiers = {t.name.lower(): indexer.num_blocks(t) for t in (Tier.HOST, Tier.DISK, Tier.SHARED)}
    return RouterState(router.config.mode, workers, indexer.num_blocks(), tiers)


def router_config(config: RoutingConfig, block_size: int) -> RouterConfig:
    """The kv router's settings from a Frontend's or Processor's routing keys."""
    return RouterConfig(
        mode="kv",
        block_size=block_size,
        overlap_weight=config.kv_overlap_weight,
        temperature=config.router_temperature,
        host_weight=config.kv_tier_host_weight,
        disk_weight=config.kv_tier_disk_weight,
        shared_weight=config.kv_tier_shared_weight,
        tier_aware=config.kv_tier_aware,
    )


async def batched(stream: ResponseStream) -> AsyncIterator[EngineOutput]:
    """The stream's outputs, those that arrived together merged into one: when the consumer
    falls behind (under load), the tokens of one read cost one detokenize and one SSE chunk
    rather than one each. Closing this closes (cancels) the stream."""
    try:
        while batch := await stream.next_batch():
            yield merge_outputs(batch)
    finally:
        await stream.aclose()


class Routing(abc.ABC):
    """Calls the engine of one model: picks the instance, streams its outputs."""

    def __init__(self, client: EndpointClient) -> None:
        self.client = client

    @abc.abstractmethod
    def stream(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]: ...

    async def stop(self) -> None:  # noqa: B027 (only routing that follows workers has work)
        """Stop following the workers."""


class Spread(Routing):
    def __init__(self, client: EndpointClient, mode: Literal["round_robin", "random"]) -> None:
        super().__init__(client)
        self._call = client.round_robin if mode == "round_robin" else client.random

    def stream(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        return batched(self._call(request))


class KvAware(Routing):
    """The KV-aware choice made here, from the workers' KV events and load."""

    def __init__(self, client: EndpointClient, runtime: DistributedRuntime, entry: ModelEntry,
                 config: RoutingConfig) -> None:  # fmt: skip
        super().__init__(client)
        self.router = KvRouter(router_config(config, entry.kv_block_size))
        self.feed = KvFeed(self.router, runtime, entry.namespace, entry.component)

    async def start(self) -> None:
        await self.feed.start(self.client.watcher)

    async def stop(self) -> None:
        await self.feed.stop()

    async def stream(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        workers = await self.client.wait_for_instance_ids()
        decision = self.router.choose(request.token_ids, workers, request.request_id)
        try:
            async for output in batched(self.client.direct(decision.worker_id, request)):
                yield output
        finally:
            self.router.release(request.request_id)


class ViaRouterService(Routing):
    """Asks the Router service which worker; tells the same Router when the stream ended.

    Routers are picked round robin among the registered ones (not through NATS's queue group,
    which also reaches a Router that subscribed but is not ready yet, and one this process saw
    fail), and the release goes to the Router that made the decision: with several Routers,
    another one does not hold the assignment, and the deciding one would count it as load on
    its worker until it expired.
    """

    def __init__(self, client: EndpointClient, router: Any) -> None:
        super().__init__(client)
        self.router = router  # the Router service's client: route / release endpoints

    async def stream(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        call = self.router.route.round_robin(RouteRequest(request.token_ids, request.request_id))
        decision = await call
        try:
            async for output in batched(self.client.direct(decision.worker_id, request)):
                yield output
        finally:
            with contextlib.suppress(Exception):  # the router also expires leaked assignments
                await self.router.release.direct(call.instance_id, request.request_id)


async def routing_for(
    runtime: DistributedRuntime,
    entry: ModelEntry,
    config: RoutingConfig,
    router_service: Any = None,
) -> Routing:
    """The routing of one model's worker endpoint under ``config``."""
    client = runtime.endpoint_client(entry.namespace, entry.component, entry.endpoint, EngineOutput)
    mode = config.router_mode
    if mode == "service":
        if router_service is None:
            raise ValueError("router_mode service needs a Router service in the graph")
        return ViaRouterService(client, router_service)
    if mode == "kv":
        if entry.kv_events and entry.kv_block_size > 0:
            routing = KvAware(client, runtime, entry, config)
            await routing.start()
            return routing
        log.warning("model %s: its workers publish no KV events; routing round robin",
                    entry.name)  # fmt: skip
        mode = "round_robin"
    return Spread(client, mode)
