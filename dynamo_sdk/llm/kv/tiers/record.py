"""The self-checking byte form of one block, as the disk and shared tiers store it.

    offset  size  field
    0       4     magic b"DYKV"
    4       2     format version (2; 1 is still read)
    6       2     reserved (0)
    8       16    layout namespace (``keys.LayoutIdentity.namespace``)
    24      32    the block's chained hash
    56      8     payload length in bytes (little-endian)
    64      4     checksum of bytes 0..63 and the payload (little-endian): version 2, the
                  low 32 bits of XXH3-64; version 1, CRC-32
    68      ...   payload (the block's KV, layers x K/V x tokens x heads x dim)

A reader checks every field against what it asked for before the payload is used: a torn
write (short file), a flipped bit (CRC), a file of another model or layout (namespace) or of
another block (hash) raises `CorruptBlockError`, so a bad file is counted and skipped, never
loaded as KV. The checksum is a guard against storage faults (a random corruption passes
it once in 2**32), not against an attacker who can write the folder. XXH3 (``xxhash``, the
hash vLLM offers for prefix caching) runs at ~30 GB/s a core, zlib's CRC-32 at ~5: on a GPU
host a long prompt's records are gigabytes, and the check was most of a disk load's time.
"""

from __future__ import annotations

import struct
import zlib

import xxhash

MAGIC = b"DYKV"
VERSION = 2
READ_VERSIONS = (1, 2)
_HEAD = struct.Struct("<4sHH16s32sQ")
HEADER_BYTES = _HEAD.size + 4  # the fields above plus the CRC


class CorruptBlockError(Exception):
    """A stored block failed a check (torn, flipped, foreign); it must not be used."""


def encode_record(namespace: bytes, block_hash: bytes, payload: bytes | memoryview) -> bytes:
    """The record of one block: header, checksum, payload."""
    head = _HEAD.pack(MAGIC, VERSION, 0, namespace, block_hash, len(payload))
    check = checksum(VERSION, head, payload)
    return b"".join((head, check.to_bytes(4, "little"), payload))


def checksum(version: int, head: bytes | memoryview, payload: bytes | memoryview) -> int:
    """The 32-bit checksum of a record's first 64 bytes and payload, as ``version`` has it."""
    if version == 1:
        return zlib.crc32(payload, zlib.crc32(head))
    digest = xxhash.xxh3_64(head)
    digest.update(payload)
    return digest.intdigest() & 0xFFFFFFFF


def decode_record(data: bytes | memoryview, namespace: bytes, block_hash: bytes) -> memoryview:
    """The payload of a record, after checking that it is whole and is the block asked for."""
    view = memoryview(data)
    if len(view) < HEADER_BYTES:
        raise CorruptBlockError(f"record of {len(view)} bytes is shorter than its header")
    payload = view[HEADER_BYTES:]
    check_record(view[:HEADER_BYTES], payload, len(view), namespace, block_hash)
    return payload


def check_record(
    head: bytes | bytearray | memoryview,
    payload: memoryview,
    size: int,
    namespace: bytes,
    block_hash: bytes,
) -> None:
    """Check a record read in two parts: its header (`HEADER_BYTES`) and its payload, of
    ``size`` bytes in all as found in storage (a reader that reads straight into a block's
    memory; `decode_record` for one that holds the whole record)."""
    if size < HEADER_BYTES:
        raise CorruptBlockError(f"record of {size} bytes is shorter than its header")
    magic, version, _, ns, h, length = _HEAD.unpack_from(head)
    if magic != MAGIC or version not in READ_VERSIONS:
        raise CorruptBlockError(f"not a KV block record (magic {magic!r}, version {version})")
    if ns != namespace:
        raise CorruptBlockError(f"record of layout {ns.hex()}, expected {namespace.hex()}")
    if h != block_hash:
        raise CorruptBlockError(f"record of block {h.hex()[:16]}, expected {block_hash.hex()[:16]}")
    if size != HEADER_BYTES + length:
        raise CorruptBlockError(
            f"record holds {size - HEADER_BYTES} payload bytes, its header says {length}"
        )
    if length != len(payload):
        raise CorruptBlockError(f"a {length}-byte payload where {len(payload)} were expected")
    check = checksum(version, memoryview(head)[: _HEAD.size], payload)
    if check != int.from_bytes(memoryview(head)[_HEAD.size : HEADER_BYTES], "little"):
        raise CorruptBlockError("record checksum mismatch")
