"""What a KV-aware router learns from workers: their KV events and load, over NATS.

Workers of one component publish KV event batches and load metrics on the component's
subjects (`kv/publisher.py`); a feed subscribes to both and applies them to a `KvRouter`, and
drops a worker from it when its etcd lease ends (so it stops attracting requests). The
Frontend (routing in-process), a Processor and the Router service each run one per worker
component they route to.

It also keeps the index honest (`kv/resync.py`): at start (a restarted router knows nothing)
and whenever NATS comes back (events published meanwhile are gone) it asks every worker for a
snapshot, and a worker whose batches show a gap is asked again, at most once a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from dynamo_sdk.llm.kv.events import (
    decode_batch,
    decode_load,
    kv_events_subject,
    load_metrics_subject,
)
from dynamo_sdk.llm.kv.resync import KvResyncRequest, encode_request, kv_resync_subject
from dynamo_sdk.llm.kv.router import KvRouter
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.runtime.discovery import InstanceWatcher

log = logging.getLogger("dynamo.llm.router")

_GONE_KEPT = 10_000  # workers whose lease ended, remembered so late batches stay out
_ASKED_KEPT = 1_024  # workers whose last snapshot request is remembered (rate limit)


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
        self.resync_subject = kv_resync_subject(namespace, component)
        self._asked: dict[int, float] = {}  # worker (0: all) -> when a snapshot was asked for
        self._deferred: set[int] = set()  # asks waiting for their interval to pass
        self.resync_requests = 0

    async def start(self, workers: InstanceWatcher) -> None:
        workers.on_removed(self._worker_gone)
        nc, ns, component = self.runtime.nc, self.namespace, self.component
        self._subs = [
            await nc.subscribe(kv_events_subject(ns, component), cb=self._on_events),
            await nc.subscribe(load_metrics_subject(ns, component), cb=self._on_load),
        ]
        self.runtime.on_nats_reconnected(self._nats_back)
        await self.ask(0)  # this router knows nothing yet

    async def ask(self, worker_id: int, min_interval: float = 1.0) -> None:
        """Ask ``worker_id`` (0: every worker) for a KV snapshot, at most every
        ``min_interval`` seconds per target."""
        now = time.monotonic()
        wait = self._asked.get(worker_id, -float("inf")) + min_interval - now
        if wait > 0:  # asked just now: ask again once the interval is over (once)
            if worker_id not in self._deferred:
                self._deferred.add(worker_id)
                asyncio.get_running_loop().call_later(wait, self._ask_deferred, worker_id)
            return
        self._asked[worker_id] = now
        if len(self._asked) > _ASKED_KEPT:  # workers come and go: keep the recent ones
            self._asked = {w: t for w, t in self._asked.items() if now - t < min_interval}
        self.resync_requests += 1
        try:
            await self.runtime.nc.publish(
                self.resync_subject, encode_request(KvResyncRequest(worker_id))
            )
        except Exception as exc:  # asked again at the next gap or reconnect
            log.warning("could not ask for KV snapshots: %s", exc)

    def _ask_deferred(self, worker_id: int) -> None:
        self._deferred.discard(worker_id)
        if self._subs:  # still running
            asyncio.get_running_loop().create_task(self.ask(worker_id))

    def _nats_back(self) -> None:
        asyncio.get_running_loop().create_task(self.ask(0, min_interval=0.0))

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
        if self.router.indexer.needs_resync(batch.worker_id):
            await self.ask(batch.worker_id)

    async def _on_load(self, msg: Any) -> None:
        try:
            self.router.update_load(decode_load(msg.data))
        except msgspec.DecodeError:
            pass
