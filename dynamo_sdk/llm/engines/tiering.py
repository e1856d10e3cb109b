"""An engine's KV tiers: its settings checked and sized, and the scheduler's onboarder.

The mocker and the torch engine share this (and `kv/tiers/`): they differ only in where the
bytes of a block live (`KvBlockIO`) and, for the mocker, in the simulated time a load takes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from dynamo_sdk.llm.engines.base import EngineConfigError
from dynamo_sdk.llm.engines.configs import KvTierConfig
from dynamo_sdk.llm.engines.scheduler import Scheduler, Sequence
from dynamo_sdk.llm.kv.block_manager import BlockManager
from dynamo_sdk.llm.kv.tiers.stack import SHARED, LoadPlan, TierPlan, TierStack

log = logging.getLogger(__name__)

GB = 1e9


def default_disk_path() -> Path:
    return Path.home() / ".cache" / "dynamo-py" / "kv"


def tier_plan(config: KvTierConfig, block_bytes: int, device_blocks: int) -> TierPlan:
    """The tiers ``config`` asks for, in blocks and bytes; `EngineConfigError` for a setting
    that cannot help (which the worker reports in one line at start, before serving)."""

    def blocks(count: int, gb: float, what: str) -> int:
        if count and gb:
            raise EngineConfigError(f"give {what}_kv_blocks or {what}_kv_gb, not both")
        return count or int(gb * GB // max(block_bytes, 1))

    host = blocks(config.host_kv_blocks, config.host_kv_gb, "host")
    disk = blocks(config.disk_kv_blocks, config.disk_kv_gb, "disk")
    if (disk or config.shared_kv) and not host:
        raise EngineConfigError(
            "disk_kv and shared_kv need a host tier (host_kv_gb or host_kv_blocks): blocks "
            "reach disk and shared storage through host memory"
        )
    check_host_size(host, device_blocks, config.offload_policy)
    path = config.disk_kv_path or str(default_disk_path())
    return TierPlan(
        host_blocks=host,
        disk_blocks=disk,
        disk_path=path if disk else "",
        shared_uri=config.shared_kv,
        policy=config.offload_policy,
        disk_admission=config.disk_kv_admission,
        load_timeout_s=config.kv_load_timeout_s,
    )


def check_host_size(host_blocks: int, device_blocks: int, policy: str) -> None:
    """`EngineConfigError` for a host tier that cannot help: under write_through it holds
    copies of what the device cache has, so it must be larger (the KVBM guide's warning)."""
    if host_blocks and policy == "write_through" and host_blocks <= device_blocks:
        raise EngineConfigError(
            f"a host KV tier of {host_blocks} blocks under write_through holds only what the "
            f"device cache ({device_blocks} blocks) already has: make it larger, or use "
            f"offload_policy: write_back"
        )


def cached_prefix_tokens(
    bm: BlockManager | None, tiers: TierStack | None, token_ids: list[int]
) -> int:
    """Leading prompt tokens an engine can serve without computing them: its device cache's
    hit, continued by the host and disk tiers (what the disaggregation rule subtracts; shared
    storage is not counted, it costs a round trip to ask)."""
    if bm is None:
        return 0
    device = len(bm.cached_prefix(token_ids))
    if tiers is None:
        return device * bm.block_size
    _, hashes = bm.match(token_ids)
    return (device + len(tiers.local_prefix(hashes[device:]))) * bm.block_size


async def stored_prefix_tokens(
    bm: BlockManager | None, tiers: TierStack | None, token_ids: list[int]
) -> int:
    """`cached_prefix_tokens`, continued by shared storage (one round trip to ask it) where
    reading it beats recomputing: what a decode worker loads instead of asking for a remote
    prefill."""
    if bm is None or tiers is None or tiers.shared is None:
        return cached_prefix_tokens(bm, tiers, token_ids)
    if not tiers.costs.worth_reading(SHARED):
        return cached_prefix_tokens(bm, tiers, token_ids)
    device = len(bm.cached_prefix(token_ids))
    _, hashes = bm.match(token_ids)
    local = device + len(tiers.local_prefix(hashes[device:]))
    return (local + await tiers.shared_prefix(hashes[local:])) * bm.block_size


LoadDelay = Callable[[Sequence, LoadPlan, int, float], Awaitable[None]]
"""Extra time a finished load takes (the mocker's simulated copy time); gets the sequence, the
plan, the number of blocks loaded and the seconds the real load took."""


class TierOnboarder:
    """The scheduler's `Onboarder` over a `TierStack`: each load runs as its own task."""

    def __init__(
        self,
        stack: TierStack,
        scheduler: Scheduler,
        wake: Callable[[], None],
        delay: LoadDelay | None = None,
    ) -> None:
        self.stack = stack
        self.scheduler = scheduler
        self._wake = wake
        self._delay = delay
        self._tasks: set[asyncio.Task[None]] = set()
        self.loads_started = 0

    def offer(self, seq: Sequence, hashes: list[bytes]) -> LoadPlan | None:
        plan = self.stack.plan_load(hashes)
        return plan if plan.worth_it else None

    def start(self, seq: Sequence, plan: object, block_ids: list[int], first_token: int) -> None:
        assert isinstance(plan, LoadPlan)
        self.loads_started += 1
        task = asyncio.create_task(self._run(seq, plan, block_ids, first_token))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, seq: Sequence, plan: LoadPlan, block_ids: list[int], first: int) -> None:
        loaded = 0
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            loaded = await self.stack.load(plan, block_ids, hits=not seq.readmitted)
            if self._delay is not None and loaded:
                await self._delay(seq, plan, loaded, loop.time() - started)
        except asyncio.CancelledError:
            loaded = 0
            raise
        finally:
            self.scheduler.finish_onboarding(seq, first + loaded * self.stack.block_size)
            self._wake()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
