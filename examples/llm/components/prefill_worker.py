"""PrefillWorker: computes prompts' KV for decode workers (disaggregated serving).

It pulls `RemotePrefillRequest`s from the prefill queue (JetStream: each goes to one prefill
worker, and comes back if this one dies before acknowledging it), runs the prompt on its own
engine, and writes the KV into the decode worker's blocks over that worker's transfer endpoint
(found in etcd with its KV layout). Whatever happens, the decode worker hears back: the KV, or
an error report that makes it prefill locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from dynamo_sdk import (
    ServiceConfig,
    async_on_shutdown,
    async_on_start,
    dynamo_context,
    endpoint,
    service,
)
from dynamo_sdk.llm.disagg.protocol import (
    KvLayout,
    RemotePrefillRequest,
    TransferEndpoint,
    TransferHeader,
    transfer_key,
)
from dynamo_sdk.llm.disagg.queue import PrefillQueue
from dynamo_sdk.llm.disagg.transfer import send_kv, transport_for
from dynamo_sdk.llm.engines.base import EngineError
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.model_resolver import resolve_model
from dynamo_sdk.llm.torch_engine.engine import TorchEngine

log = logging.getLogger("dynamo.llm.prefill")

FRAMEWORK_KEYS = {"engine", "model", "served_model_name", "max_inflight"}


# peer_gpus: it also sees the decode workers' GPUs (after its own), so it can write KV
# straight into their caches through CUDA IPC; pinned to its GPU alone it would fall back to TCP.
@service(dynamo={"namespace": "dynamo"}, resources={"gpu": 1}, workers=1, peer_gpus=True)
class PrefillWorker:
    def __init__(self) -> None:
        self.config: dict[str, Any] = ServiceConfig.get_instance().for_service("PrefillWorker")
        self.max_inflight = int(self.config.get("max_inflight", 8))
        self.engine: TorchEngine | None = None
        self.queue: PrefillQueue | None = None
        self._task: asyncio.Task[None] | None = None
        self.counts = {"prefilled": 0, "failed": 0, "dropped": 0, "tokens_sent": 0,
                       "via_cuda_ipc": 0, "via_tcp": 0}  # fmt: skip

    @async_on_start
    async def start(self) -> None:
        name = str(self.config.get("engine", "torch"))
        path = str(await asyncio.to_thread(resolve_model, str(self.config.get("model", "auto"))))
        engine_config = {k: v for k, v in self.config.items() if k not in FRAMEWORK_KEYS}
        engine = create_engine(name, path, engine_config)
        if not isinstance(engine, TorchEngine):
            raise EngineError(f"PrefillWorker needs an engine that exports KV (torch), not {name}")
        await engine.start()
        self.engine = engine
        self.layout = KvLayout(**engine.kv_layout())
        runtime = dynamo_context.runtime
        assert runtime is not None
        self.endpoints = runtime.watch_prefix(f"kv_transfer/{PrefillWorker.namespace}/")
        self.queue = PrefillQueue(runtime.nc, PrefillWorker.namespace)
        await self.queue.ensure()
        self._task = asyncio.create_task(self._serve_queue())
        log.info("prefill worker ready (%s engine, KV layout %s)", name, self.layout)

    @endpoint()
    async def stats(self, _: str) -> dict[str, int]:
        return dict(self.counts)

    @async_on_shutdown
    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.queue is not None:
            await self.queue.close()
        if self.engine is not None:
            await self.engine.shutdown()

    async def _serve_queue(self) -> None:
        assert self.queue is not None
        slots = asyncio.Semaphore(self.max_inflight)
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
            for msg, request in items:
                task = asyncio.create_task(self._prefill(msg, request))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))

    async def _prefill(self, msg: Any, req: RemotePrefillRequest) -> None:
        assert self.engine is not None
        raw = self.endpoints.values.get(transfer_key(PrefillWorker.namespace, req.decode_instance))
        if raw is None:  # the decode worker is gone: nobody waits for this KV
            self.counts["dropped"] += 1
            await msg.ack()
            return
        endpoint = msgspec.msgpack.decode(raw, type=TransferEndpoint)
        try:
            diff = self.layout.mismatch(endpoint.layout)
            if diff is not None:
                raise EngineError(f"KV layout mismatch (prefill vs decode worker): {diff}")
            covered, kv = await self.engine.prefill_and_export(req.request, req.first_block)
            block_ids = req.block_ids[req.first_block : covered // self.layout.block_size]
            header = TransferHeader(req.transfer_id, block_ids, self.layout, num_tokens=covered)
            via = transport_for(endpoint, kv)
            await send_kv(endpoint, header, kv)
            self.counts["prefilled"] += 1
            self.counts[f"via_{via}"] += 1
            self.counts["tokens_sent"] += covered
        except Exception as exc:
            self.counts["failed"] += 1
            log.warning("prefill of %s failed: %s", req.transfer_id, exc)
            with contextlib.suppress(Exception):
                await send_kv(endpoint, TransferHeader(req.transfer_id, error=str(exc)), None)
        finally:
            await msg.ack()
