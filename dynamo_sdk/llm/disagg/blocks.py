"""The `blocks` transport: KV written straight into the decode engine's blocks (torch engine).

Decode side: the engine allocates the prompt's blocks and hands them to `remote_prefill`,
which queues a job naming them and waits for the prefill worker to write them (`KvReceiver`,
`disagg/transfer.py`); no KV within the timeout, and the engine computes the prompt itself.
Prefill side: compute the prompt (`prefill_and_export`), write every prompt token's KV but the
last into the decode worker's blocks (`send_kv`: CUDA IPC when it can map that GPU, else TCP).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from dynamo_sdk.llm.disagg.protocol import (
    RemotePrefillRequest,
    TransferEndpoint,
    TransferHeader,
    TransportKind,
)
from dynamo_sdk.llm.disagg.transport import DecodeSide, DecodeTransport, PrefillTransport
from dynamo_sdk.llm.engines.base import GenerateOptions, KvPort, PrefillSlots
from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest

if TYPE_CHECKING:
    from dynamo_sdk.llm.disagg.transfer import KvReceiver

log = logging.getLogger(__name__)


def transfer_id(request: PreprocessedRequest) -> str:
    """Names one transfer on the receiver (a request may be retried: unique per attempt)."""
    return f"{request.request_id}:{uuid.uuid4().hex[:12]}"


class BlockDecode(DecodeTransport):
    kind = TransportKind.BLOCKS

    def __init__(self, side: DecodeSide) -> None:
        super().__init__(side)
        port = side.engine.kv_port()
        assert port is not None
        self.port: KvPort = port
        self.receiver: KvReceiver | None = None

    async def start(self, host: str) -> TransferEndpoint:
        from dynamo_sdk.llm.disagg.transfer import KvReceiver

        port = self.port
        self.receiver = KvReceiver(
            port.kv_layout(), port.write_kv, host=host, cache=port.kv_cache_tensor()
        )
        return await self.receiver.start()

    async def stop(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()

    async def generate_remote(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        side, receiver = self.side, self.receiver
        assert receiver is not None
        started = False

        async def remote_prefill(slots: PrefillSlots) -> int:
            nonlocal started
            started = True
            side.counts.remote += 1
            tid = transfer_id(request)
            receiver.expect(tid, slots.block_ids)
            first = slots.num_cached_tokens // slots.block_size
            job = RemotePrefillRequest(request, side.instance_id, slots.block_ids, first, tid)
            try:
                await side.submit(job)
            except Exception:
                receiver.forget(tid)
                raise
            written = await receiver.wait(tid, side.prefill_timeout)
            if written:
                side.counts.remote_tokens += written
            else:
                log.warning("%s: no KV from a prefill worker; prefilling locally", tid)
                side.counts.fallback += 1
            return written

        stream = side.engine.generate(request, GenerateOptions(remote_prefill=remote_prefill))
        async for output in stream:
            if output.cached_tokens is not None and not started:
                side.counts.local_no_blocks += 1  # no free blocks to offer: computed here
            yield output


class BlockPrefill(PrefillTransport):
    kind = TransportKind.BLOCKS

    def _port(self) -> KvPort:
        port = self.engine.kv_port()
        assert port is not None
        return port

    def engine_layout(self) -> KvLayout:
        return self._port().kv_layout()

    async def prefill(self, job: RemotePrefillRequest, endpoint: TransferEndpoint) -> None:
        from dynamo_sdk.llm.disagg.transfer import send_kv, transport_for

        assert self.layout is not None
        covered, kv = await self._port().prefill_and_export(job.request, job.first_block)
        block_ids = job.block_ids[job.first_block : -(-covered // self.layout.block_size)]
        header = TransferHeader(job.transfer_id, block_ids, self.layout, num_tokens=covered)
        via = transport_for(endpoint, kv)
        await send_kv(endpoint, header, kv)
        self.counts.sent(via, covered)
