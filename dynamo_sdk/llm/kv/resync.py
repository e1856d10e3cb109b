"""Rebuilding a router's view of a worker's KV: snapshots on request.

A router's index is only as good as the events it received. Events published while NATS was
away, a batch lost on the way (the indexer sees the gap in ``seq``), or a router that
(re)started after the workers did, all leave it wrong: blocks it thinks a worker holds that
are gone, blocks a worker holds that it never heard of. So a router can ask: it publishes a
`KvResyncRequest` on the component's resync subject (for one worker, or for all), and each
worker it names answers with a snapshot batch, its whole state in every tier it owns:
``AllBlocksCleared`` for the device, host and disk tiers, then one ``BlockStored`` per tier
with every block held there. The indexer treats a batch that starts with the device
``AllBlocksCleared`` as a full rebuild (`KvIndexer.needs_resync` turns false).

Blocks in shared storage are not in a snapshot: they belong to the storage, not to the
worker, and every worker's announcements of them still stand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import Meta

from dynamo_sdk.llm.kv.events import AllBlocksCleared, BlockStored, KvEvent
from dynamo_sdk.llm.kv.hashing import hash_to_int

if TYPE_CHECKING:
    from dynamo_sdk.llm.kv.block_manager import BlockManager
    from dynamo_sdk.llm.kv.tiers.stack import TierStack

_I64 = 2**63 - 1


class KvResyncRequest(msgspec.Struct, frozen=True):
    """Announce your whole KV state: ``worker_id`` 0 asks every worker of the component."""

    worker_id: Annotated[int, Meta(ge=0, le=_I64)] = 0


_decoder = msgspec.msgpack.Decoder(KvResyncRequest)


def encode_request(request: KvResyncRequest) -> bytes:
    return msgspec.msgpack.encode(request)


def decode_request(data: bytes) -> KvResyncRequest:
    """Raises ``msgspec.ValidationError`` / ``DecodeError`` for anything else."""
    return _decoder.decode(data)


def kv_resync_subject(namespace: str, component: str) -> str:
    """The NATS subject routers ask a component's workers for KV snapshots on."""
    return f"dyn.{namespace}.{component}._kv_resync"


def _stored(hashes: list[bytes], block_size: int, medium: str | None) -> BlockStored:
    return BlockStored(
        block_hashes=[hash_to_int(h) for h in hashes],
        parent_block_hash=None,
        token_ids=[],
        block_size=block_size,
        medium=medium,
    )


def snapshot_events(block_manager: BlockManager, tiers: TierStack | None) -> list[KvEvent]:
    """A worker's whole KV state as one batch's events (see module docstring)."""
    bs = block_manager.block_size
    events: list[KvEvent] = [AllBlocksCleared()]
    device = block_manager.cached_hashes()
    if device:
        events.append(_stored(device, bs, None))
    if tiers is not None:
        for medium, hashes in tiers.held_hashes().items():
            events.append(AllBlocksCleared(medium=medium))
            if hashes:
                events.append(_stored(hashes, bs, medium))
    return events
