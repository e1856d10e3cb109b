"""What a KV-aware router learns from workers: their KV events and load, over NATS.

Workers of one component publish KV event batches and load metrics on the component's
subjects (`kv/publisher.py`); a feed subscribes to both and applies them to a `KvRouter`, and
drops a worker from it when its etcd lease ends (so it stops attracting requests). The
Frontend (routing in-process), a Processor and the Router service each run one per worker
component they route to.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from dynamo_sdk.llm.kv.events import (
    decode_batch,
    decode_load,
    kv_events_subject,
    load_metrics_subject,
)
from dynamo_sdk.llm.kv.router import KvRouter
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.runtime.discovery import InstanceWatcher

log = logging.getLogger("dynamo.llm.router")

_GONE_KEPT = 10_000  # workers whose lease ended, remembered so late batches stay out


class KvFeed:
    """Feeds `router` with the events and load of `namespace/component`'s workers."""

    def __init__(
        self, router: KvRouter, runtime: DistributedRuntime, namespace: str, component: str
    ) -> None:
        self.router = router
        self.runtime = runtime
        self.namespace = namespace
        self.component = component
        self._gone: dict[int, None] = {}  # insertion-ordered, bounded
        self._subs: list[Any] = []

    async def start(self, workers: InstanceWatcher) -> None:
        workers.on_removed(self._worker_gone)
        nc, ns, component = self.runtime.nc, self.namespace, self.component
        self._subs = [
            await nc.subscribe(kv_events_subject(ns, component), cb=self._on_events),
            await nc.subscribe(load_metrics_subject(ns, component), cb=self._on_load),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is already closing
                pass
        self._subs.clear()

    def _worker_gone(self, worker_id: int) -> None:
        self._gone[worker_id] = None
        while len(self._gone) > _GONE_KEPT:
            del self._gone[next(iter(self._gone))]
        log.info("worker %x left: dropping its %d indexed blocks", worker_id,
                 self.router.indexer.blocks_of(worker_id))  # fmt: skip
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
