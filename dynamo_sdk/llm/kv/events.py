"""KV-cache events and load metrics: what workers publish and the KV-aware router consumes.

The event shapes mirror vLLM's (``vllm/distributed/kv_events.py``) minus the fields our router
does not use (LoRA, medium, extra keys), so a vLLM event stream converts field for field. Block
hashes are the 64-bit wire form from ``hashing.hash_to_int``.

Events travel in per-worker ``KvEventBatch``es whose ``seq`` increases by one per batch; the
indexer uses it to notice lost batches (a gap) or redeliveries (a repeat) and ask for a resync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec

from dynamo_sdk.llm.kv.hashing import hash_to_int

_log = logging.getLogger(__name__)


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    """Full blocks became cached, in chain order; ``parent_block_hash`` precedes the first one
    (``None``: the first block is the start of a sequence). ``token_ids`` covers all blocks."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    """Cached blocks were evicted; the router must stop counting on them."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    """The worker dropped its whole prefix cache (e.g. a cache reset)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, frozen=True):
    """Events of one worker, in the order they happened; ``seq`` counts batches per worker."""

    worker_id: int
    seq: int
    events: list[KvEvent]


class LoadMetrics(msgspec.Struct, frozen=True):
    """A worker's load snapshot, the router's cost input besides prefix overlap."""

    worker_id: int
    kv_usage: float
    active_blocks: int
    total_blocks: int
    running: int
    waiting: int


def kv_events_subject(namespace: str, component: str) -> str:
    """The NATS subject a component's workers publish ``KvEventBatch``es on."""
    return f"dyn.{namespace}.{component}._kv_events"


def load_metrics_subject(namespace: str, component: str) -> str:
    """The NATS subject a component's workers publish ``LoadMetrics`` on."""
    return f"dyn.{namespace}.{component}._load"


# Encoders/decoders are reusable and thread-safe for reading; build them once.
encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(KvEventBatch)
load_decoder = msgspec.msgpack.Decoder(LoadMetrics)


def encode(msg: KvEventBatch | LoadMetrics) -> bytes:
    """Serialize a batch or load snapshot to msgpack."""
    return encoder.encode(msg)


def decode_batch(data: bytes) -> KvEventBatch:
    """Parse and validate a ``KvEventBatch``; raises ``msgspec.ValidationError`` if malformed."""
    return batch_decoder.decode(data)


def decode_load(data: bytes) -> LoadMetrics:
    """Parse and validate ``LoadMetrics``; raises ``msgspec.ValidationError`` if malformed."""
    return load_decoder.decode(data)


def _wire_hash(h: int | bytes) -> int:
    return h if isinstance(h, int) else hash_to_int(h)


def from_vllm(event: dict[str, Any]) -> KvEvent | None:
    """Convert one msgpack-decoded vLLM KV event (a map tagged ``"type"``) to ours.

    vLLM 0.32's ZMQ publisher sends multipart ``(topic, seq: 8-byte big-endian, payload)``;
    ``payload`` is msgpack ``[ts, [event, ...], data_parallel_rank]`` and each event a map such
    as ``{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., ...}``. Hashes
    are u64 ints by default, raw digests if ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``; both
    become the same int here. Unknown event types give ``None``.
    """
    kind = event.get("type")
    if kind == "BlockStored":
        parent = event.get("parent_block_hash")
        return BlockStored(
            block_hashes=[_wire_hash(h) for h in event["block_hashes"]],
            parent_block_hash=None if parent is None else _wire_hash(parent),
            token_ids=list(event["token_ids"]),
            block_size=event["block_size"],
        )
    if kind == "BlockRemoved":
        return BlockRemoved([_wire_hash(h) for h in event["block_hashes"]])
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


KvEventCallback = Callable[[list[KvEvent]], None]


class KvEventFanout:
    """Hands an engine's KV events to every subscriber (a worker's publisher, tests); a failing
    subscriber is logged and never allowed to break the engine's scheduling."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._callbacks: list[KvEventCallback] = []

    def subscribe(self, callback: KvEventCallback | None) -> None:
        if callback is not None:
            self._callbacks.append(callback)

    def publish(self, events: list[KvEvent]) -> None:
        for callback in self._callbacks:
            try:
                callback(events)
            except Exception:
                _log.exception("%s: KV event callback failed", self._owner)
