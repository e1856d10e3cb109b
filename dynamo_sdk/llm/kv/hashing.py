"""vLLM-compatible chained block hashes, so router-side hashes equal the hashes engines publish.

The router predicts which worker holds a request's prefix by hashing the prompt itself and
looking the hashes up in the index built from the workers' KV events. That only works if the
router computes bit-for-bit what vLLM computes, so this module reproduces vLLM 0.32 with
``prefix_caching_hash_algo="sha256_cbor"`` (``vllm/v1/core/kv_cache_utils.py``:
``hash_block_tokens``, ``init_none_hash``, ``resolve_none_hash_seed``;
``vllm/utils/hashing.py``: ``sha256_cbor``) for text-only requests (no LoRA, multimodal
inputs, cache salt or prompt embeddings, i.e. ``extra_keys=None``):

    cbor(x)     = cbor2.dumps(x, canonical=True)
    NONE_HASH   = sha256(cbor(seed))                 seed = $PYTHONHASHSEED if set,
                                                            else "vllm-none-hash"
    hash(b_0)   = sha256(cbor((NONE_HASH, tuple(tokens_0), None)))
    hash(b_i)   = sha256(cbor((hash(b_{i-1}), tuple(tokens_i), None)))

Only full blocks are hashed; each hash commits to the whole prefix before it. Hashes are the
32-byte SHA-256 digests. The CBOR of a block is written here byte for byte (``_block_cbor``)
rather than by ``cbor2.dumps``: the shape never changes (a 3-array of a 32-byte string, an array
of ints, null), and building it from pre-encoded token ids halves the cost of a hash, which
routers and block managers pay for every block of every prompt. Anything outside that shape
goes through cbor2.

On the wire (KV events, the indexer) a block hash is a 64-bit unsigned int. vLLM 0.32 publishes
``maybe_convert_block_hash(h)``, which by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``) is
``int.from_bytes(h, "big") & (2**64 - 1)``: the last 8 bytes of the digest read big-endian.
``hash_to_int`` is exactly that, so ``hash_to_int(block_hash(...))`` equals the value in
vLLM's ``BlockStored.block_hashes``. (With that variable set to 0 vLLM sends the raw 32 bytes
instead; ``hash_to_int`` of those bytes gives the same int.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache

import cbor2

DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_U64_MASK = (1 << 64) - 1


def _sha256_cbor(obj: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _cbor_uint(value: int) -> bytes:
    """Canonical CBOR of a non-negative int below 2**32 (major type 0, shortest form)."""
    if value < 24:
        return bytes((value,))
    if value < 1 << 8:
        return bytes((0x18, value))
    if value < 1 << 16:
        return b"\x19" + value.to_bytes(2, "big")
    return b"\x1a" + value.to_bytes(4, "big")


# Token ids below this have their CBOR encoding precomputed (~5 MB, built on first use); a
# block with any other id (negative, or from a vocabulary past 131k) is encoded by cbor2.
_FAST_IDS = 1 << 17
_token_cbor: list[bytes] | None = None


def _token_table() -> list[bytes]:
    global _token_cbor
    table = _token_cbor
    if table is None:  # built whole, then published: threads never see half a table
        table = [_cbor_uint(i) for i in range(_FAST_IDS)]
        _token_cbor = table
    return table


def _block_cbor(parent: bytes, tokens: tuple[int, ...]) -> bytes | None:
    """``cbor2.dumps((parent, tokens, None), canonical=True)``, or None outside the fast path."""
    n = len(tokens)
    if len(parent) != 32 or n >= 1 << 16 or (n and (min(tokens) < 0 or max(tokens) >= _FAST_IDS)):
        return None
    # 0x83: array of 3; 0x58 0x20: byte string of 32; then the token array's header.
    head = (
        bytes((0x80 + n,))
        if n < 24
        else b"\x98" + bytes((n,))
        if n < 256
        else b"\x99" + n.to_bytes(2, "big")
    )
    return (
        b"\x83\x58\x20"
        + parent
        + head
        + b"".join(map(_token_table().__getitem__, tokens))
        + b"\xf6"
    )


@lru_cache(maxsize=16)
def _none_hash_for(seed: str) -> bytes:
    return _sha256_cbor(seed)


def none_hash(seed: str | None = None) -> bytes:
    """The parent hash of a sequence's first block.

    With no ``seed``, resolves it the way vLLM does for a cryptographic hash: ``PYTHONHASHSEED``
    if set, else ``"vllm-none-hash"``. Engines and routers must agree on this, so set
    PYTHONHASHSEED identically everywhere or nowhere.
    """
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)
    return _none_hash_for(seed)


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Hash one full block chained on ``parent`` (``None`` or empty: the first block)."""
    # vLLM tests `if not parent_block_hash`, so empty bytes also mean "first block".
    return _cached_block_hash(parent or none_hash(), tuple(tokens))


@lru_cache(maxsize=1 << 16)
def _cached_block_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    # Like vLLM's own cache on this function: multi-turn conversations and shared system
    # prompts re-hash the same blocks for every request (a hit costs ~0.3 µs, a miss ~1.5 µs).
    encoded = _block_cbor(parent, tokens)
    if encoded is None:
        return _sha256_cbor((parent, tokens, None))
    return hashlib.sha256(encoded).digest()


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of every full block of ``token_ids``; a trailing partial block is skipped."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def hash_to_int(h: bytes) -> int:
    """The 64-bit wire form vLLM's KV events carry: the digest big-endian, masked to 64 bits."""
    return int.from_bytes(h, "big") & _U64_MASK


def block_hashes_int(token_ids: Sequence[int], block_size: int) -> list[int]:
    """``block_hashes`` in wire form: what a router looks up in the ``KvIndexer``."""
    return [hash_to_int(h) for h in block_hashes(token_ids, block_size)]
