"""KV-cache awareness: vLLM-compatible block hashing, paged-block bookkeeping, KV events, and
the global prefix index the KV-aware router queries.

Kept import-light (msgspec and cbor2 only) so the router can use it without an engine;
`block_copy` (torch) is not imported here.
"""

from dynamo_sdk.llm.kv.block_manager import Allocation, BlockManager, NoFreeBlocksError
from dynamo_sdk.llm.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
    LoadMetrics,
    kv_events_subject,
    load_metrics_subject,
)
from dynamo_sdk.llm.kv.hashing import block_hash, block_hashes, hash_to_int, none_hash
from dynamo_sdk.llm.kv.indexer import KvIndexer

__all__ = [
    "AllBlocksCleared",
    "Allocation",
    "BlockManager",
    "BlockRemoved",
    "BlockStored",
    "KvEvent",
    "KvEventBatch",
    "KvIndexer",
    "LoadMetrics",
    "NoFreeBlocksError",
    "block_hash",
    "block_hashes",
    "hash_to_int",
    "kv_events_subject",
    "load_metrics_subject",
    "none_hash",
]
