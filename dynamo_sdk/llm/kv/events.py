"""KV-cache events and load metrics: what workers publish and the KV-aware router consumes.

The event shapes mirror vLLM's (``vllm/distributed/kv_events.py``) minus the fields our router
does not use (LoRA, extra keys, cache-spec metadata), so a vLLM event stream converts field
for field. Block hashes are the 64-bit wire form from ``hashing.hash_to_int``.

Tiers. A worker's blocks may live in more than its GPU: in host memory, on a local disk, or in
shared storage every worker of the model can load from. ``BlockStored``, ``BlockRemoved`` and
``AllBlocksCleared`` say which through ``medium`` (vLLM's field: ``"GPU"``, ``"CPU"``, ...);
``None``, the default, is the device (GPU) tier, so events of senders that predate tiers, and
vLLM's own GPU block-pool events, mean what they always meant. ``tier_of`` maps a medium to a
`Tier`. The field is omitted from the wire when it is ``None`` (``omit_defaults``): a device
event encodes exactly as before, and a batch encoded without the field decodes.

Events travel in per-worker ``KvEventBatch``es whose ``seq`` increases by one per batch; the
indexer uses it to notice lost batches (a gap) or redeliveries (a repeat) and ask for a resync.

Anyone who reaches NATS can publish on the events subject, so what a batch may carry is
bounded here and checked when it is decoded (`decode_batch` raises ``msgspec.ValidationError``
past a bound): ids and sequence numbers to int64 (hashes are msgpack's 64-bit ints), at most
``MAX_BLOCKS_PER_EVENT`` blocks and ``MAX_TOKENS_PER_EVENT`` token ids per event (no more
tokens than its blocks hold), ``MAX_EVENTS_PER_BATCH`` events per batch, load figures to
their ranges. What the router then does with a batch of a worker it does not know is the
indexer's business (`indexer.py`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dynamo_sdk.llm.kv.hashing import hash_to_int

_log = logging.getLogger(__name__)

# The mediums this project's workers put in events (vLLM's "GPU" and "CPU" included).
MEDIUM_DEVICE = "GPU"
MEDIUM_HOST = "CPU"
MEDIUM_DISK = "DISK"
MEDIUM_SHARED = "SHARED"


class Tier(enum.IntEnum):
    """Where a cached block lives, fastest first: the order in which a router prefers them."""

    DEVICE = 0  # GPU memory: usable as is
    HOST = 1  # host memory: a PCIe copy away
    DISK = 2  # the worker's local disk: storage I/O, then the copy
    SHARED = 3  # shared storage (a shared folder, Redis): any worker of the model can load it


# Spellings seen in the wild (vLLM's "GPU"/"CPU"/"STORAGE", LMCache's and Mooncake's lower case),
# upper-cased. vLLM's "STORAGE" is local unless its event says ``locality="REMOTE"``, which
# ``from_vllm`` turns into SHARED before it gets here.
_TIER_OF_MEDIUM: dict[str, Tier] = {
    "GPU": Tier.DEVICE,
    "CUDA": Tier.DEVICE,
    "DEVICE": Tier.DEVICE,
    "HBM": Tier.DEVICE,
    "CPU": Tier.HOST,
    "HOST": Tier.HOST,
    "DRAM": Tier.HOST,
    "PINNED": Tier.HOST,
    "DISK": Tier.DISK,
    "SSD": Tier.DISK,
    "NVME": Tier.DISK,
    "STORAGE": Tier.DISK,
    "LOCAL_DISK": Tier.DISK,
    "SHARED": Tier.SHARED,
    "REMOTE": Tier.SHARED,
    "NETWORK": Tier.SHARED,
}
# tier_of's answers, by the spelling as sent (the indexer asks once per non-device event)
_tier_cache: dict[str | None, Tier] = {None: Tier.DEVICE}
_tier_cache.update(_TIER_OF_MEDIUM)


def tier_of(medium: str | None) -> Tier:
    """The tier a ``medium`` names: None and GPU spellings (``"GPU"``, ``"cuda:0"``) are the
    device, ``"CPU"``/``"host"`` host memory, ``"DISK"``/``"SSD"`` local disk, ``"SHARED"``/
    ``"remote"`` shared storage; case does not matter.

    An unknown medium is treated as DISK and logged at debug level (once per spelling): some
    tier below the GPU holds the block, and DISK's credit is the conservative guess: a block
    credited too little costs a slightly worse choice, one credited as a GPU hit would draw
    requests to a worker that then has to load (or recompute) it.
    """
    try:
        return _tier_cache[medium]
    except KeyError:
        pass
    assert medium is not None  # None is in the cache
    name = medium.strip().upper()
    tier = _TIER_OF_MEDIUM.get(name)
    if tier is None:
        if name.startswith(("CUDA", "GPU")):  # "cuda:0", "GPU0"
            tier = Tier.DEVICE
        else:
            _log.debug("unknown KV medium %r: treated as DISK", medium)
            tier = Tier.DISK
    if len(_tier_cache) < 256:  # bounded: a misbehaving sender cannot grow it forever
        _tier_cache[medium] = tier
    return tier


# -- bounds (see the module docstring) ------------------------------------------------------

I64_MAX = 2**63 - 1
I32_MAX = 2**31 - 1
# A disk tier announces what it holds in one event: 1M blocks (about 9 MB of msgpack, more
# than NATS carries by default: a bound, not a budget)
MAX_BLOCKS_PER_EVENT = 1 << 20
MAX_TOKENS_PER_EVENT = 1 << 22  # a BlockStored's token ids: its blocks' tokens
MAX_EVENTS_PER_BATCH = 1 << 16
MAX_BLOCK_SIZE = 1 << 16
MAX_MEDIUM = 64  # characters of a medium's name

BlockHash = int  # the 64-bit wire form (msgpack carries no wider int)
WorkerId = Annotated[int, Meta(ge=0, le=I64_MAX)]  # an instance id: its etcd lease
Medium = Annotated[str, Meta(max_length=MAX_MEDIUM)]
_Hashes = Annotated[list[BlockHash], Meta(max_length=MAX_BLOCKS_PER_EVENT)]
_Count = Annotated[int, Meta(ge=0, le=I64_MAX)]


class BlockStored(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Full blocks became cached, in chain order; ``parent_block_hash`` precedes the first one
    (``None``: the first block is the start of a sequence). ``token_ids`` covers all blocks
    (senders that do not track tokens send none). ``medium``: the tier they are now in
    (``None``: the device; see `tier_of`)."""

    block_hashes: _Hashes
    parent_block_hash: BlockHash | None
    token_ids: Annotated[list[Annotated[int, Meta(ge=0, le=I32_MAX)]],
                         Meta(max_length=MAX_TOKENS_PER_EVENT)]  # fmt: skip
    block_size: Annotated[int, Meta(ge=1, le=MAX_BLOCK_SIZE)]
    medium: Medium | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) > len(self.block_hashes) * self.block_size:
            raise ValueError("token_ids: more tokens than the event's blocks hold")


class BlockRemoved(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Cached blocks were evicted from ``medium``'s tier (``None``: the device); the router must
    stop counting on them there (a copy in another tier still counts)."""

    block_hashes: _Hashes
    medium: Medium | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """The worker dropped its whole cache in ``medium``'s tier (``None``: the device, as when
    vLLM resets its GPU prefix cache; the worker's host and disk copies stay indexed). With the
    SHARED medium, the shared storage itself was wiped: no worker can load from it any more."""

    medium: Medium | None = None


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, frozen=True):
    """Events of one worker, in the order they happened; ``seq`` counts batches per worker."""

    worker_id: WorkerId
    seq: Annotated[int, Meta(ge=0, le=I64_MAX)]
    events: Annotated[list[KvEvent], Meta(max_length=MAX_EVENTS_PER_BATCH)]


class LoadMetrics(msgspec.Struct, frozen=True):
    """A worker's load snapshot, the router's cost input besides prefix overlap."""

    worker_id: WorkerId
    kv_usage: Annotated[float, Meta(ge=0.0, le=1.0)]
    active_blocks: _Count
    total_blocks: _Count
    running: _Count
    waiting: _Count


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
    become the same int here. ``medium`` (``"GPU"``, ``"CPU"``, ``"STORAGE"`` with a
    ``locality``; absent before vLLM had offloading tiers) becomes ours (`_vllm_medium`).
    Unknown event types give ``None``, and so do malformed ones (logged): the events come from
    a socket, and one bad message must not stop the bridge reading the next.
    """
    try:
        converted = _from_vllm(event)
    except (KeyError, TypeError, ValueError, AttributeError, msgspec.ValidationError) as exc:
        _log.warning("malformed vLLM KV event dropped: %s: %s", type(exc).__name__, exc)
        return None
    if converted is None:
        return None
    try:  # the same bounds as on the wire (`decode_batch`)
        return msgspec.convert(msgspec.to_builtins(converted), KvEvent)
    except msgspec.ValidationError as exc:
        _log.warning("vLLM KV event out of bounds dropped: %s", exc)
        return None


def _from_vllm(event: dict[str, Any]) -> KvEvent | None:
    kind = event.get("type")
    if kind == "BlockStored":
        parent = event.get("parent_block_hash")
        return BlockStored(
            block_hashes=[_wire_hash(h) for h in event["block_hashes"]],
            parent_block_hash=None if parent is None else _wire_hash(parent),
            token_ids=list(event["token_ids"]),
            block_size=event["block_size"],
            medium=_vllm_medium(event),
        )
    if kind == "BlockRemoved":
        return BlockRemoved([_wire_hash(h) for h in event["block_hashes"]], _vllm_medium(event))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


_MEDIUM_OF_TIER = {Tier.HOST: MEDIUM_HOST, Tier.DISK: MEDIUM_DISK, Tier.SHARED: MEDIUM_SHARED}


def _vllm_medium(event: dict[str, Any]) -> str | None:
    """A vLLM event's ``medium`` (and ``locality``) in our terms: ``None`` for the GPU (and for
    senders without the field), ``MEDIUM_SHARED`` for storage it calls ``REMOTE``,
    ``MEDIUM_DISK`` for other storage; anything else is kept as sent (see `tier_of`)."""
    medium = event.get("medium")
    if not isinstance(medium, str):
        return None
    name = medium.strip().upper()
    tier = tier_of(name)
    if name == "STORAGE" and str(event.get("locality") or "").upper() == "REMOTE":
        tier = Tier.SHARED
    if tier is Tier.DEVICE:
        return None
    return _MEDIUM_OF_TIER[tier] if name in _TIER_OF_MEDIUM else medium


KvEventCallback = Callable[[list[KvEvent]], None]


class KvEventFanout:
    """Hands an engine's KV events to every subscriber (a worker's publisher, tests); a failing
    subscriber is logged and never allowed to break the engine's scheduling.

    Events published before anyone subscribed (an engine announcing, while it starts, the disk
    tier's blocks from an earlier run) are kept, up to ``backlog`` batches, and handed to the
    first subscriber that takes them (``replay=True``, the worker's publisher), so the router
    learns what a restarted worker still holds.
    """

    def __init__(self, owner: str, backlog: int = 1024) -> None:
        self._owner = owner
        self._callbacks: list[KvEventCallback] = []
        self._backlog: list[list[KvEvent]] | None = []
        self._backlog_limit = backlog

    def subscribe(self, callback: KvEventCallback | None, *, replay: bool = False) -> None:
        if callback is None:
            return
        self._callbacks.append(callback)
        backlog, self._backlog = self._backlog, None  # kept only until someone listens
        if replay and backlog:
            for events in backlog:
                self._deliver(callback, events)

    def publish(self, events: list[KvEvent]) -> None:
        if not self._callbacks:
            if self._backlog is not None and len(self._backlog) < self._backlog_limit:
                self._backlog.append(events)
            return
        for callback in self._callbacks:
            self._deliver(callback, events)

    def _deliver(self, callback: KvEventCallback, events: list[KvEvent]) -> None:
        try:
            callback(events)
        except Exception:
            _log.exception("%s: KV event callback failed", self._owner)
