"""`LLMPrefillWorker`: computes prompts' KV for decode workers (disaggregated serving).

It pulls `RemotePrefillRequest`s from the prefill queue (JetStream: each goes to one prefill
worker, and comes back if this one dies before acknowledging it), runs the prompt on its own
engine, and hands the KV to the decode worker over that worker's transfer endpoint (found in
etcd with its KV layout), through the engine family's prefill transport
(`disagg/transport.py`). Whatever happens, the decode worker hears back: the KV (or its
notice), or an error report that makes it prefill locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import msgspec

from dynamo_sdk.llm.disagg.protocol import RemotePrefillRequest, TransferEndpoint, transfer_key
from dynamo_sdk.llm.disagg.queue import PrefillQueue
from dynamo_sdk.llm.disagg.transport import PrefillCounts, PrefillTransport, prefill_transport
from dynamo_sdk.llm.engines.base import Engine, EngineError, RequestLimits, check_request
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.model_resolver import resolve_model
from dynamo_sdk.llm.worker.config import PrefillConfig
from dynamo_sdk.llm.worker.worker import model_vocab_size
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.runtime.discovery import PrefixWatcher

log = logging.getLogger("dynamo.llm.prefill")


class LLMPrefillWorker:
    """Serves the prefill queue of one namespace with one engine."""

    def __init__(self, config: PrefillConfig) -> None:
        self.config = config
        self.counts = PrefillCounts()
        self.engine: Engine | None = None
        self.transport: PrefillTransport | None = None
        self.queue: PrefillQueue | None = None
        self.endpoints: PrefixWatcher | None = None
        self.namespace = ""
        self.limits: RequestLimits | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, runtime: DistributedRuntime, namespace: str) -> None:
        keys = self.config.keys
        path = str(await asyncio.to_thread(resolve_model, keys.model))
        engine = create_engine(keys.engine, path, self.config.engine)
        self.transport = prefill_transport(engine, self.counts)  # refused before weights load
        await engine.start()
        self.engine = engine
        self.limits = RequestLimits(
            context_length=engine.context_length,
            vocab_size=engine.vocab_size or model_vocab_size(path),
        )
        self.namespace = namespace
        prefix = f"kv_transfer/{namespace}/"
        self.endpoints = runtime.watch_prefix(prefix)
        self.queue = PrefillQueue(runtime.nc, namespace)
        await self.queue.ensure()
        await self.transport.start(self.endpoints, prefix)
        self._task = asyncio.create_task(self._serve_queue())
        log.info("prefill worker ready (%s engine, %s transport, KV layout %s)",
                 keys.engine, self.transport.kind, self.transport.layout)  # fmt: skip

    def shutdown_reserve(self) -> float:
        """Seconds `stop()` needs: the engine's stop, and one for the rest."""
        return self.engine.stop_timeout + 1.0 if self.engine is not None else 0.0

    def stats(self) -> dict[str, int]:
        return dataclasses.asdict(self.counts)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.transport is not None:
            await self.transport.stop()
        if self.queue is not None:
            await self.queue.close()
        if self.engine is not None:
            await self.engine.shutdown()

    async def _serve_queue(self) -> None:
        assert self.queue is not None
        slots = asyncio.Semaphore(self.config.keys.max_inflight)
        tasks: set[asyncio.Task[None]] = set()
        while True:
            await slots.acquire()
            try:
                items = await self.queue.pull(1, timeout=1.0)
            except Exception:
                log.exception("prefill queue pull failed")
                items = []
                await asyncio.sleep(1.0)
            if not items:
                slots.release()
                continue
            for msg, job in items:
                task = asyncio.create_task(self._prefill(msg, job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: slots.release())

    async def _prefill(self, msg: Any, job: RemotePrefillRequest) -> None:
        """One job. Anyone on NATS can put one on the queue and anyone who can write etcd an
        endpoint, so both are checked here: the endpoint decodes into its typed struct (a CUDA
        IPC handle included: never anything executable) or the job is dropped, and the prompt
        must suit this worker's model (`check_request`) or the decode worker is told at once."""
        transport, endpoints, limits = self.transport, self.endpoints, self.limits
        assert transport is not None and endpoints is not None and limits is not None
        try:
            raw = endpoints.values.get(transfer_key(self.namespace, job.decode_instance))
            if raw is None:  # the decode worker is gone: nobody waits for this KV
                self.counts.dropped += 1
                return
            try:
                endpoint = msgspec.msgpack.decode(raw, type=TransferEndpoint)
            except msgspec.DecodeError as exc:  # nobody to report to: drop the job
                self.counts.failed += 1
                log.warning("prefill of %s dropped: the decode worker's endpoint is invalid: "
                            "%s", job.transfer_id, exc)  # fmt: skip
                return
            try:
                check_request(job.request, limits)
                assert transport.layout is not None
                diff = transport.layout.mismatch(endpoint.layout)
                if diff is not None:
                    raise EngineError(f"KV layout mismatch (prefill vs decode worker): {diff}")
                if job.kind != transport.kind:
                    raise EngineError(
                        f"the decode worker wants KV via {job.kind}; this prefill worker's "
                        f"engine moves it via {transport.kind} (run both on the same engine)"
                    )
                await transport.prefill(job, endpoint)
            except Exception as exc:
                self.counts.failed += 1
                log.warning("prefill of %s failed: %s", job.transfer_id, exc)
                with contextlib.suppress(Exception):
                    await transport.report_failure(job, endpoint, str(exc))
        finally:
            await msg.ack()
