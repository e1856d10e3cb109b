"""How a prompt's KV gets from a prefill worker to a decode worker: one transport per family.

* `blocks` (`disagg/blocks.py`): engines with a `kv_port()` (the torch engine). The decode
  engine allocates the prompt's blocks, the prefill worker computes the prompt and writes its
  KV straight into those blocks (CUDA IPC on one machine, else TCP).
* `connector` (`disagg/connector.py`): engines with a `kv_connector()` (vLLM). The prefill
  engine's connector saves the KV to shared storage, the prefill worker sends a notice, and
  the decode engine's connector loads it as an external prefix hit.

Each family has a decode half and a prefill half; `decode_transport` / `prefill_transport`
pick them from what the engine declares it can do. Both sides of a transfer must be of one
family (a job says which; a prefill worker refuses a job of another).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from dynamo_sdk.llm.disagg.protocol import TransportKind
from dynamo_sdk.llm.engines.base import Engine, EngineConfigError
from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.protocol import EngineOutput, PreprocessedRequest

if TYPE_CHECKING:
    from dynamo_sdk.llm.disagg.protocol import RemotePrefillRequest, TransferEndpoint
    from dynamo_sdk.runtime.discovery import PrefixWatcher

__all__ = ["DecodeTransport", "PrefillTransport", "TransportKind", "decode_transport"]


Submit = Callable[["RemotePrefillRequest"], Awaitable[None]]


@dataclass
class DecodeCounts:
    """Conditional-disaggregation decisions and transfers of one decode worker so far."""

    remote: int = 0  # prefills sent to the prefill queue
    local_short: int = 0  # few uncached tokens: computed here
    local_queue_full: int = 0  # the prefill queue was too deep: computed here
    local_no_blocks: int = 0  # no free blocks to offer a prefill worker: computed here
    fallback: int = 0  # sent, but no KV came back (failure, timeout): computed here
    remote_tokens: int = 0  # prompt tokens whose KV arrived from prefill workers
    # KV announced by a prefill worker that the engine did not load (vLLM connector: storage
    # not shared, or the prompt was cached here meanwhile): computed here
    remote_unloaded: int = 0


@dataclass
class PrefillCounts:
    """What one prefill worker did so far."""

    prefilled: int = 0
    failed: int = 0
    dropped: int = 0  # the decode worker was gone: nobody waited for the KV
    tokens_sent: int = 0
    via_cuda_ipc: int = 0  # how the KV went
    via_tcp: int = 0
    via_connector: int = 0

    def sent(self, via: Literal["cuda_ipc", "tcp", "connector"], tokens: int) -> None:
        self.prefilled += 1
        self.tokens_sent += tokens
        setattr(self, f"via_{via}", getattr(self, f"via_{via}") + 1)


@dataclass(frozen=True)
class DecodeSide:
    """What a decode transport needs from its worker."""

    engine: Engine
    instance_id: int  # the decode worker's (its etcd lease)
    prefill_timeout: float
    submit: Submit  # puts a job on the prefill queue
    counts: DecodeCounts


class DecodeTransport(abc.ABC):
    """The decode half: receives KV (or notices) and runs requests whose prefill is remote."""

    kind: ClassVar[TransportKind]

    def __init__(self, side: DecodeSide) -> None:
        self.side = side

    @abc.abstractmethod
    async def start(self, host: str) -> TransferEndpoint:
        """Listen for transfers; the endpoint prefill workers find in etcd."""

    @abc.abstractmethod
    def generate_remote(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        """Run ``request`` with its prompt prefilled by a prefill worker (computed here if
        none delivers within the timeout)."""

    @abc.abstractmethod
    async def stop(self) -> None: ...


class PrefillTransport(abc.ABC):
    """The prefill half: computes a job's prompt and delivers its KV to the decode worker."""

    kind: ClassVar[TransportKind]

    def __init__(self, engine: Engine, counts: PrefillCounts) -> None:
        self.engine = engine
        self.counts = counts
        self.layout: KvLayout | None = None  # the engine's, once it started

    @abc.abstractmethod
    def engine_layout(self) -> KvLayout:
        """The started engine's KV layout (what decode workers must share)."""

    async def start(self, endpoints: PrefixWatcher, prefix: str) -> None:
        """Once the engine started: read its layout; background work given the live decode
        workers' endpoints (none by default)."""
        self.layout = self.engine_layout()

    @abc.abstractmethod
    async def prefill(self, job: RemotePrefillRequest, endpoint: TransferEndpoint) -> None:
        """Compute the prompt and deliver its KV; raises when that failed."""

    async def report_failure(
        self, job: RemotePrefillRequest, endpoint: TransferEndpoint, error: str
    ) -> None:
        """Tell the decode worker at once, so it prefills locally instead of timing out."""
        from dynamo_sdk.llm.disagg.protocol import MAX_ERROR, TransferHeader
        from dynamo_sdk.llm.disagg.transfer import send_kv

        header = TransferHeader(job.transfer_id, error=error[:MAX_ERROR])
        await send_kv(endpoint, header, None)

    async def stop(self) -> None:  # noqa: B027 (no background work unless a family has some)
        """Stop the background work."""


def decode_transport(side: DecodeSide) -> DecodeTransport:
    """The decode half for this engine's family."""
    engine = side.engine
    if engine.kv_port() is not None:
        from dynamo_sdk.llm.disagg.blocks import BlockDecode

        return BlockDecode(side)
    if engine.kv_connector() is not None:
        from dynamo_sdk.llm.disagg.connector import ConnectorDecode

        return ConnectorDecode(side)
    raise EngineConfigError(
        "remote_prefill needs an engine that takes KV transfers (torch, or vllm with a KV "
        f"connector), not {type(engine).__name__}"
    )


def prefill_transport(engine: Engine, counts: PrefillCounts) -> PrefillTransport:
    """The prefill half for this engine's family."""
    if engine.kv_port() is not None:
        from dynamo_sdk.llm.disagg.blocks import BlockPrefill

        return BlockPrefill(engine, counts)
    if engine.kv_connector() is not None:
        from dynamo_sdk.llm.disagg.connector import ConnectorPrefill

        return ConnectorPrefill(engine, counts)
    raise EngineConfigError(
        "a PrefillWorker needs an engine that exports KV (torch, or vllm with a KV connector), "
        f"not {type(engine).__name__}"
    )
