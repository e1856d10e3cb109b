"""A worker's side of KV routing: its KV events and load, published on NATS.

Engines report KV events through a callback (from whatever thread or task they run in); the
publisher batches them per event-loop turn into `KvEventBatch`es with increasing sequence
numbers, so a router can tell a gap (a lost batch) from a quiet worker. Load metrics go out
every `load_interval` seconds. The first batch is `AllBlocksCleared`: a (re)started worker
tells routers to forget whatever they thought it held. A router that lost track (a gap, an
outage, its own restart) asks for a snapshot (`kv/resync.py`): the worker publishes its whole
state as one batch, at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from dynamo_sdk.llm.kv.events import (
    AllBlocksCleared,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
    encode,
    kv_events_subject,
    load_metrics_subject,
)
from dynamo_sdk.llm.kv.resync import decode_request, kv_resync_subject
from dynamo_sdk.runtime import DistributedRuntime

log = logging.getLogger(__name__)


class KvPublisher:
    def __init__(
        self,
        runtime: DistributedRuntime,
        namespace: str,
        component: str,
        load: Callable[[int], LoadMetrics],
        load_interval: float = 0.25,
        snapshot: Callable[[], list[KvEvent] | None] | None = None,
        snapshot_interval: float = 1.0,
    ) -> None:
        self.runtime = runtime
        self.worker_id = runtime.instance_id
        self.events_subject = kv_events_subject(namespace, component)
        self.load_subject = load_metrics_subject(namespace, component)
        self._load = load
        self._interval = load_interval
        self._pending: list[KvEvent] = []
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self.resync_subject = kv_resync_subject(namespace, component)
        self._snapshot = snapshot
        self._snapshot_interval = snapshot_interval
        self._last_snapshot = -float("inf")
        self._sub: Any = None
        self.snapshots = 0  # snapshots published (on routers' requests)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pending.insert(0, AllBlocksCleared())
        self._schedule_flush()
        self._task = asyncio.create_task(self._publish_load())
        if self._snapshot is not None:
            self._sub = await self.runtime.nc.subscribe(self.resync_subject, cb=self._on_resync)

    async def _on_resync(self, msg: Any) -> None:
        """A router asks for a snapshot (of this worker, or of all): publish one, unless one
        went out within ``snapshot_interval`` (a storm of requests costs one a second)."""
        try:
            request = decode_request(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if request.worker_id not in (0, self.worker_id) or self._snapshot is None:
            return
        now = time.monotonic()
        if now - self._last_snapshot < self._snapshot_interval:
            return
        self._last_snapshot = now
        await self._flush()  # what happened before goes first
        events = self._snapshot()
        if events is None:
            return
        # events the engine reported meanwhile are in the snapshot's state already; applied
        # after it again they change nothing
        self._pending = events + self._pending
        self.snapshots += 1
        await self._flush()

    def on_events(self, events: list[KvEvent]) -> None:
        """The engine's callback; safe from the loop's own thread (the usual case)."""
        self._pending.extend(events)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(lambda: asyncio.ensure_future(self._flush()))

    async def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        events, self._pending = self._pending, []
        self._seq += 1
        batch = KvEventBatch(worker_id=self.worker_id, seq=self._seq, events=events)
        try:
            await self.runtime.nc.publish(self.events_subject, encode(batch))
        except Exception as exc:  # a router that missed it will see the gap and resync
            log.warning("could not publish KV events: %s", exc)

    async def _publish_load(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.runtime.nc.publish(self.load_subject, encode(self._load(self.worker_id)))
            except Exception as exc:
                log.debug("could not publish load metrics: %s", exc)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
