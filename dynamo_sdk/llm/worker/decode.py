"""A decode worker's disaggregation: which prompts go to prefill workers, and how.

For each request, the rule in `disagg/policy.py` (uncached prompt tokens over
`max_local_prefill_length`, prefill queue under `max_prefill_queue_size`) says local or
remote. Remote requests run through the engine family's decode transport
(`disagg/transport.py`): it offers the prompt to the prefill queue (JetStream, `queue.py`) and
has the KV delivered, or prefills locally when none arrives within `prefill_timeout`. The
receiver's address and KV layout are advertised in etcd under `kv_transfer/{ns}/{instance}`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator

import msgspec

from dynamo_sdk.llm.disagg.policy import DisaggConfig
from dynamo_sdk.llm.disagg.protocol import transfer_key
from dynamo_sdk.llm.disagg.queue import PrefillQueue
from dynamo_sdk.llm.disagg.transport import DecodeCounts, DecodeSide, DecodeTransport
from dynamo_sdk.llm.disagg.transport import decode_transport as transport_for
from dynamo_sdk.llm.engines.base import Engine
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_sdk.runtime import DistributedRuntime

log = logging.getLogger("dynamo.llm.decode")

TRANSFER_HOST_ENV = "DYN_KV_TRANSFER_HOST"  # the address prefill workers reach this one at


class DecodeRole:
    """Conditional disaggregation for one decode worker's engine."""

    def __init__(self, engine: Engine, config: DisaggConfig) -> None:
        self.engine = engine
        self.config = config
        self.counts = DecodeCounts()
        self.queue: PrefillQueue | None = None
        self.transport: DecodeTransport | None = None

    async def start(self, runtime: DistributedRuntime, namespace: str) -> None:
        self.queue = PrefillQueue(runtime.nc, namespace)
        await self.queue.ensure()
        side = DecodeSide(
            self.engine, runtime.instance_id, self.config.prefill_timeout, self.queue.put,
            self.counts,
        )  # fmt: skip
        self.transport = transport_for(side)
        host = os.environ.get(TRANSFER_HOST_ENV, "127.0.0.1")
        endpoint = await self.transport.start(host)
        await runtime.put_leased(
            transfer_key(namespace, runtime.instance_id), msgspec.msgpack.encode(endpoint)
        )
        ipc = " (and through CUDA IPC)" if endpoint.cuda_ipc else ""
        log.info("disaggregated prefill on (%s transport): KV at %s:%d%s",
                 self.transport.kind, host, endpoint.port, ipc)  # fmt: skip

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        assert self.transport is not None
        stream = (
            self.transport.generate_remote(request)
            if await self._goes_remote(request)
            else self.engine.generate(request)
        )
        async for output in stream:
            yield output

    async def _goes_remote(self, request: PreprocessedRequest) -> bool:
        """The conditional-disaggregation rule, logged and counted (except "remote", counted
        once a prefill is actually sent). Tokens the engine can load from shared KV storage
        count as cached (asked only for a prompt that would otherwise go remote: a round
        trip). An engine that cannot say what it has cached (vLLM)
        counts every prompt token as uncached: a prompt cached there still goes remote when it
        is long, and the connector then loads nothing."""
        assert self.queue is not None
        tokens = request.token_ids
        uncached = len(tokens) - self.engine.cached_prefix_tokens(tokens)
        if uncached > self.config.max_local_prefill_length:  # before sending it away: can it
            uncached = len(tokens) - await self.engine.stored_prefix_tokens(tokens)  # be loaded?
        depth = await self.queue.depth() if uncached > self.config.max_local_prefill_length else 0
        decision = self.config.decide(uncached, depth)
        log.debug("%s: %s prefill (%d uncached tokens, queue %d)",
                  request.request_id, decision, uncached, depth)  # fmt: skip
        if decision == "remote":
            return True
        setattr(self.counts, decision, getattr(self.counts, decision) + 1)
        return False

    def stats(self) -> dict[str, int]:
        return dataclasses.asdict(self.counts)

    async def stop(self) -> None:
        if self.transport is not None:
            await self.transport.stop()
        if self.queue is not None:
            await self.queue.close()
