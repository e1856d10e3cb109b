"""A worker's side of KV routing: its KV events and load, published on NATS.

Engines report KV events through a callback (from whatever thread or task they run in); the
publisher batches them per event-loop turn into `KvEventBatch`es with increasing sequence
numbers, so a router can tell a gap (a lost batch) from a quiet worker. Load metrics go out
every `load_interval` seconds. The first batch is `AllBlocksCleared`: a (re)started worker
tells routers to forget whatever they thought it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from dynamo_sdk.llm.kv.events import (
    AllBlocksCleared,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
    encode,
    kv_events_subject,
    load_metrics_subject,
)
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

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pending.insert(0, AllBlocksCleared())
        self._schedule_flush()
        self._task = asyncio.create_task(self._publish_load())

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
