"""Where a block lives in a tier: its chained hash, namespaced by the layout that made its KV.

A block's KV is only meaningful to an engine that would have computed the same bytes: same
model, dtype, block size, layer count, KV heads, head dim and tensor-parallel rank. Every tier
key carries a short digest of that identity, so two models (or one model in two dtypes) sharing
a disk folder or a Redis never read each other's KV, and a key written by one process is found
by any other with the same identity: the digest and the block hashes are built from the values
alone (sha256 of canonical bytes), never from Python's per-process ``hash()``.
"""

from __future__ import annotations

import hashlib

import msgspec

NAMESPACE_BYTES = 16


class LayoutIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """What must be equal for two workers' KV blocks to be interchangeable."""

    model: str  # the served model's name or its folder's content id
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1

    def namespace(self) -> bytes:
        """A 16-byte digest of the identity (stable across processes, hosts and restarts)."""
        canonical = msgspec.json.encode(self, order="sorted")
        return hashlib.sha256(b"dynamo-kv-layout-v1\0" + canonical).digest()[:NAMESPACE_BYTES]

    def namespace_hex(self) -> str:
        return self.namespace().hex()


def block_key(namespace: bytes, block_hash: bytes) -> str:
    """The text key of a block in a store: ``<namespace hex>/<block hash hex>``."""
    return f"{namespace.hex()}/{block_hash.hex()}"


def split_key(key: str) -> tuple[bytes, bytes]:
    """(namespace, block hash) of a key from ``block_key``; ValueError if it is not one."""
    ns, _, h = key.partition("/")
    namespace, block_hash = bytes.fromhex(ns), bytes.fromhex(h)
    if len(namespace) != NAMESPACE_BYTES or len(block_hash) != 32:
        raise ValueError(f"not a KV block key: {key!r}")
    return namespace, block_hash
