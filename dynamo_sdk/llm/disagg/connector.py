"""The `connector` transport: KV through the engine's own KV connector (vLLM).

vLLM's blocks cannot be written from outside, so no blocks are offered: the prefill worker
runs the prompt for one token while its connector (`DynamoStorageConnector`,
`disagg/vllm_connector.py`) saves the prompt's KV to a folder both workers read, then sends a
notice without payload; the decode engine gets the transfer's storage key in its
`kv_transfer_params` and its connector loads the KV as an external prefix hit (computing only
the rest) and deletes it. No notice within the timeout: the prompt is prefilled locally.
Stored KV nobody will load (a late prefill, a decode worker that died) is swept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_sdk.llm.disagg.blocks import transfer_id
from dynamo_sdk.llm.disagg.kv_storage import (
    PARAMS_KEY,
    instance_dir,
    remove_stored,
    storage_key,
    sweep_own,
    sweep_storage,
)
from dynamo_sdk.llm.disagg.protocol import (
    RemotePrefillRequest,
    TransferEndpoint,
    TransferHeader,
    TransportKind,
)
from dynamo_sdk.llm.disagg.transport import (
    DecodeSide,
    DecodeTransport,
    PrefillCounts,
    PrefillTransport,
)
from dynamo_sdk.llm.engines.base import Engine, EngineError, GenerateOptions, KvConnector
from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest

if TYPE_CHECKING:
    from dynamo_sdk.llm.disagg.transfer import KvReceiver
    from dynamo_sdk.runtime.discovery import PrefixWatcher

log = logging.getLogger(__name__)


def _connector(engine: Engine) -> KvConnector:
    connector = engine.kv_connector()
    assert connector is not None
    return connector


def _no_block_writes(block_ids: list[int], kv: Any) -> None:
    raise EngineError("this decode worker (vLLM) takes KV through its KV connector, not blocks")


class ConnectorDecode(DecodeTransport):
    kind = TransportKind.CONNECTOR

    def __init__(self, side: DecodeSide) -> None:
        super().__init__(side)
        self.connector = _connector(side.engine)
        self.receiver: KvReceiver | None = None
        self._loading: set[str] = set()  # storage keys of requests that may still load
        self._sweep_task: asyncio.Task[None] | None = None

    async def start(self, host: str) -> TransferEndpoint:
        from dynamo_sdk.llm.disagg.transfer import KvReceiver

        # notices only: the receiver checks the sender's layout, the KV goes through storage
        self.receiver = KvReceiver(self.connector.kv_layout(), _no_block_writes, host=host)
        endpoint = await self.receiver.start()
        self._sweep_task = asyncio.create_task(self._sweep())
        log.info("KV through the vLLM connector, stored in %s", self.connector.storage_root)
        return endpoint

    async def stop(self) -> None:
        if self._sweep_task is not None:
            self._sweep_task.cancel()
            with contextlib.suppress(BaseException):
                await self._sweep_task
        if self.receiver is not None:
            await self.receiver.stop()

    async def generate_remote(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        key = await self._prefill_elsewhere(request)
        params = {PARAMS_KEY: {"load": key}} if key else None
        report: dict[str, Any] = {}
        options = GenerateOptions(kv_transfer_params=params, on_kv_transfer=report.update)
        try:
            async for output in self.side.engine.generate(request, options):
                yield output
        finally:
            self._loading.discard(key)
        if params is not None:
            loaded = int((report.get(PARAMS_KEY) or {}).get("loaded", 0))
            self.side.counts.remote_tokens += loaded
            if not loaded:
                self.side.counts.remote_unloaded += 1

    async def _prefill_elsewhere(self, request: PreprocessedRequest) -> str:
        """Queue the prompt for a prefill worker and wait for its notice; the storage key to
        load from, or "" when the prompt must be prefilled here."""
        side, receiver, root = self.side, self.receiver, self.connector.storage_root
        assert receiver is not None
        side.counts.remote += 1
        tid = transfer_id(request)
        key = storage_key(side.instance_id, tid)
        receiver.expect(tid, [])
        job = RemotePrefillRequest(request, side.instance_id, [], 0, tid, kind=self.kind)
        self._loading.add(key)
        try:
            await side.submit(job)
            stored = await receiver.wait(tid, side.prefill_timeout)
        except BaseException:
            receiver.forget(tid)
            self._loading.discard(key)
            remove_stored(root, key)  # the engine never saw this key
            raise
        if stored:
            return key
        log.warning("%s: no KV from a prefill worker; prefilling locally", tid)
        side.counts.fallback += 1
        self._loading.discard(key)
        remove_stored(root, key)  # whatever a failed prefill worker left
        return ""

    async def _sweep(self) -> None:
        """Now and then, delete this worker's stored KV that no request will load (what a late
        prefill worker wrote after its request stopped waiting), so storage stays bounded."""
        root = self.connector.storage_root
        min_age = max(60.0, 2 * self.side.prefill_timeout)
        while True:
            await asyncio.sleep(min_age / 2)
            try:
                removed = await asyncio.to_thread(
                    sweep_own, root, self.side.instance_id, set(self._loading), min_age
                )
            except OSError:
                log.warning("sweeping %s failed", root, exc_info=True)
                continue
            if removed:
                log.info("removed %d stale stored KV folder(s) from %s", removed, root)


class ConnectorPrefill(PrefillTransport):
    kind = TransportKind.CONNECTOR

    def __init__(self, engine: Engine, counts: PrefillCounts) -> None:
        super().__init__(engine, counts)
        self.root = _connector(engine).storage_root
        self._sweep_task: asyncio.Task[None] | None = None

    def engine_layout(self) -> KvLayout:
        return _connector(self.engine).kv_layout()

    async def start(self, endpoints: PrefixWatcher, prefix: str) -> None:
        await super().start(endpoints, prefix)
        self._sweep_task = asyncio.create_task(self._sweep(endpoints, prefix))

    async def stop(self) -> None:
        if self._sweep_task is not None:
            self._sweep_task.cancel()
            with contextlib.suppress(BaseException):
                await self._sweep_task

    async def prefill(self, job: RemotePrefillRequest, endpoint: TransferEndpoint) -> None:
        """Run the prompt for one token while the KV connector stores its KV under the
        transfer's key, then notify the decode worker. KV nobody will load (the notice was
        refused: the decode worker stopped waiting) is deleted here."""
        from dynamo_sdk.llm.disagg.transfer import send_notice

        key = storage_key(job.decode_instance, job.transfer_id)
        stop = msgspec.structs.replace(job.request.stop, max_tokens=1, min_tokens=0)
        one = msgspec.structs.replace(
            job.request, request_id=f"prefill-{job.transfer_id}", stop=stop,
            output=msgspec.structs.replace(job.request.output, logprobs=None),
        )  # fmt: skip
        report: dict[str, Any] = {}
        options = GenerateOptions(
            kv_transfer_params={PARAMS_KEY: {"store": key}}, on_kv_transfer=report.update
        )
        try:
            async for _ in self.engine.generate(one, options):
                pass
            stored = int((report.get(PARAMS_KEY) or {}).get("stored", 0))
            if not stored:
                size = self.layout.block_size if self.layout else "?"
                raise EngineError(
                    f"no KV stored for a {len(job.request.token_ids)}-token prompt (at least one "
                    f"whole block plus a token is needed; block size {size})"
                )
            header = TransferHeader(job.transfer_id, layout=self.layout, num_tokens=stored)
            await send_notice(endpoint, header)
        except BaseException:
            remove_stored(self.root, key)
            raise
        self.counts.sent("connector", stored)

    async def _sweep(self, endpoints: PrefixWatcher, prefix: str) -> None:
        """Every 30 s, delete stored KV of decode workers that are gone (they died between a
        prefill and its load: nobody else would ever delete it)."""
        while True:
            await asyncio.sleep(30.0)
            live = _live_instances(endpoints.values, prefix)
            try:
                removed = await asyncio.to_thread(sweep_storage, self.root, live)
            except OSError:
                log.warning("sweeping %s failed", self.root, exc_info=True)
                continue
            if removed:
                log.info("removed stored KV of %d departed decode worker(s)", removed)


def _live_instances(keys: Iterable[str], prefix: str) -> set[str]:
    """The instance folders (`instance_dir`) of the decode workers registered under
    ``prefix``; a key whose last part is no instance id (etcd is writable by others) names
    none, and must not stop the sweep."""
    live: set[str] = set()
    for key in keys:
        if not key.startswith(prefix):
            continue
        try:
            live.add(instance_dir(int(key.rsplit("/", 1)[-1], 16)))
        except ValueError:
            log.debug("ignoring transfer endpoint key %r", key[:200])
    return live
