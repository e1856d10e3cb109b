"""PrefillWorker: computes prompts' KV for decode workers (disaggregated serving).

It pulls `RemotePrefillRequest`s from the prefill queue (JetStream: each goes to one prefill
worker, and comes back if this one dies before acknowledging it), runs the prompt on its own
engine, and hands the KV to the decode worker over that worker's transfer endpoint (found in
etcd with its KV layout):

* torch engine: the KV is written into the decode worker's blocks (TCP or CUDA IPC);
* vLLM engine: the prompt runs with one output token while vLLM's KV connector
  (`dynamo_sdk.llm.disagg.vllm_connector`) saves its KV to shared storage, and the decode worker
  gets a notice (no payload); its own connector loads the KV from there.

Whatever happens, the decode worker hears back: the KV (or its notice), or an error report that
makes it prefill locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, cast

import msgspec

from dynamo_sdk import (
    ServiceConfig,
    async_on_shutdown,
    async_on_start,
    dynamo_context,
    endpoint,
    service,
)
from dynamo_sdk.llm.disagg.kv_storage import (
    PARAMS_KEY,
    instance_dir,
    remove_stored,
    storage_key,
    storage_root,
    sweep_storage,
)
from dynamo_sdk.llm.disagg.protocol import (
    KvLayout,
    RemotePrefillRequest,
    TransferEndpoint,
    TransferHeader,
    transfer_key,
)
from dynamo_sdk.llm.disagg.queue import PrefillQueue
from dynamo_sdk.llm.engines.base import EngineError
from dynamo_sdk.llm.engines.registry import create_engine
from dynamo_sdk.llm.model_resolver import resolve_model

if TYPE_CHECKING:
    from dynamo_sdk.llm.engines.vllm_engine import VllmEngine
    from dynamo_sdk.llm.torch_engine.engine import TorchEngine

# The engines and the KV transfer bring PyTorch (and vLLM): they are imported when a
# PrefillWorker starts, not when a graph that contains one is loaded by its other processes.

log = logging.getLogger("dynamo.llm.prefill")

FRAMEWORK_KEYS = {"engine", "model", "served_model_name", "max_inflight"}


# peer_gpus: it also sees the decode workers' GPUs (after its own), so it can write KV
# straight into their caches through CUDA IPC; pinned to its GPU alone it would fall back to TCP.
@service(dynamo={"namespace": "dynamo"}, resources={"gpu": 1}, workers=1, peer_gpus=True)
class PrefillWorker:
    def __init__(self) -> None:
        self.config: dict[str, Any] = ServiceConfig.get_instance().for_service("PrefillWorker")
        self.max_inflight = int(self.config.get("max_inflight", 8))
        self.engine: TorchEngine | VllmEngine | None = None
        self.kv_via = "blocks"  # "connector" for a vLLM engine
        self.kv_storage = ""  # the vLLM connector's shared folder
        self.queue: PrefillQueue | None = None
        self._task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self.counts = {"prefilled": 0, "failed": 0, "dropped": 0, "tokens_sent": 0,
                       "via_cuda_ipc": 0, "via_tcp": 0, "via_connector": 0}  # fmt: skip

    @async_on_start
    async def start(self) -> None:
        name = str(self.config.get("engine", "torch"))
        path = str(await asyncio.to_thread(resolve_model, str(self.config.get("model", "auto"))))
        engine_config = {k: v for k, v in self.config.items() if k not in FRAMEWORK_KEYS}
        from dynamo_sdk.llm.engines.vllm_engine import VllmEngine
        from dynamo_sdk.llm.torch_engine.engine import TorchEngine

        engine = create_engine(name, path, engine_config)
        if isinstance(engine, VllmEngine):
            try:
                self.kv_storage = storage_root(self.config.get("kv_transfer_config"))
            except ValueError as exc:
                raise EngineError(str(exc)) from exc
            self.kv_via = "connector"
        elif not isinstance(engine, TorchEngine):
            raise EngineError(
                f"PrefillWorker needs an engine that exports KV (torch, or vllm with a KV "
                f"connector), not {name}"
            )
        await engine.start()
        self.engine = engine
        self.layout = KvLayout(**engine.kv_layout())
        runtime = dynamo_context.runtime
        assert runtime is not None
        self.endpoints = runtime.watch_prefix(f"kv_transfer/{PrefillWorker.namespace}/")
        self.queue = PrefillQueue(runtime.nc, PrefillWorker.namespace)
        await self.queue.ensure()
        self._task = asyncio.create_task(self._serve_queue())
        if self.kv_via == "connector":
            self._sweep_task = asyncio.create_task(self._sweep_storage())
        log.info("prefill worker ready (%s engine, KV layout %s)", name, self.layout)

    @endpoint()
    async def stats(self, _: str) -> dict[str, int]:
        return dict(self.counts)

    @async_on_shutdown
    async def stop(self) -> None:
        for task in (self._task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
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
        from dynamo_sdk.llm.disagg.transfer import send_kv, transport_for

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
            if req.kv_via != self.kv_via:
                raise EngineError(
                    f"the decode worker wants KV via {req.kv_via!r}; this prefill worker's "
                    f"engine moves it via {self.kv_via!r} (run both on the same engine)"
                )
            if self.kv_via == "connector":
                await self._prefill_via_connector(cast("VllmEngine", self.engine), endpoint, req)
                return
            engine = cast("TorchEngine", self.engine)
            covered, kv = await engine.prefill_and_export(req.request, req.first_block)
            block_ids = req.block_ids[req.first_block : -(-covered // self.layout.block_size)]
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

    async def _prefill_via_connector(
        self, engine: VllmEngine, endpoint: TransferEndpoint, req: RemotePrefillRequest
    ) -> None:
        """Run the prompt for one token while the KV connector stores its KV under the
        transfer's key, then notify the decode worker. KV nobody will load (the notice was
        refused: the decode worker stopped waiting) is deleted here."""
        from dynamo_sdk.llm.disagg.transfer import send_notice

        key = storage_key(req.decode_instance, req.transfer_id)
        stop = msgspec.structs.replace(req.request.stop, max_tokens=1, min_tokens=0)
        one = msgspec.structs.replace(
            req.request, request_id=f"prefill-{req.transfer_id}", stop=stop,
            output=msgspec.structs.replace(req.request.output, logprobs=None),
        )  # fmt: skip
        report: dict[str, Any] = {}
        try:
            async for _ in engine.generate(one, {PARAMS_KEY: {"store": key}}, report.update):
                pass
            stored = int((report.get(PARAMS_KEY) or {}).get("stored", 0))
            if not stored:
                raise EngineError(
                    f"no KV stored for a {len(req.request.token_ids)}-token prompt (at least one "
                    f"whole block plus a token is needed; block size {self.layout.block_size})"
                )
            header = TransferHeader(req.transfer_id, layout=self.layout, num_tokens=stored)
            await send_notice(endpoint, header)
        except BaseException:
            remove_stored(self.kv_storage, key)
            raise
        self.counts["prefilled"] += 1
        self.counts["via_connector"] += 1
        self.counts["tokens_sent"] += stored

    async def _sweep_storage(self) -> None:
        """Every 30 s, delete stored KV of decode workers that are gone (they died between a
        prefill and its load: nobody else would ever delete it)."""
        prefix = f"kv_transfer/{PrefillWorker.namespace}/"
        while True:
            await asyncio.sleep(30.0)
            live = {instance_dir(int(k.rsplit("/", 1)[-1], 16)) for k in self.endpoints.values
                    if k.startswith(prefix)}  # fmt: skip
            try:
                removed = await asyncio.to_thread(sweep_storage, self.kv_storage, live)
            except OSError:
                log.warning("sweeping %s failed", self.kv_storage, exc_info=True)
                continue
            if removed:
                log.info("removed stored KV of %d departed decode worker(s)", removed)
