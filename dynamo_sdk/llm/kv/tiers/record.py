"""The self-checking byte form of one block, as the disk and shared tiers store it.

    offset  size  field
    0       4     magic b"DYKV"
    4       2     format version (1)
    6       2     reserved (0)
    8       16    layout namespace (``keys.LayoutIdentity.namespace``)
    24      32    the block's chained hash
    56      8     payload length in bytes (little-endian)
    64      4     CRC-32 of bytes 0..63 and the payload (little-endian)
    68      ...   payload (the block's KV, layers x K/V x tokens x heads x dim)

A reader checks every field against what it asked for before the payload is used: a torn
write (short file), a flipped bit (CRC), a file of another model or layout (namespace) or of
another block (hash) raises `CorruptBlockError`, so a bad file is counted and skipped, never
loaded as KV. CRC-32 (zlib, ~GB/s) catches every burst error shorter than 32 bits; this is a
guard against storage faults, not against an attacker who can write the folder.
"""

from __future__ import annotations

import struct
import zlib

MAGIC = b"DYKV"
VERSION = 1
_HEAD = struct.Struct("<4sHH16s32sQ")
HEADER_BYTES = _HEAD.size + 4  # the fields above plus the CRC


class CorruptBlockError(Exception):
    """A stored block failed a check (torn, flipped, foreign); it must not be used."""


def encode_record(namespace: bytes, block_hash: bytes, payload: bytes | memoryview) -> bytes:
    """The record of one block: header, checksum, payload."""
    head = _HEAD.pack(MAGIC, VERSION, 0, namespace, block_hash, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, crc.to_bytes(4, "little"), payload))


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
    if magic != MAGIC or version != VERSION:
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
    crc = zlib.crc32(payload, zlib.crc32(memoryview(head)[: _HEAD.size]))
    if crc != int.from_bytes(memoryview(head)[_HEAD.size : HEADER_BYTES], "little"):
        raise CorruptBlockError("record checksum mismatch")
