"""`KvLayout`: the shape of an engine's KV blocks, which two workers must share to move KV."""

from __future__ import annotations

import msgspec


class KvLayout(msgspec.Struct, frozen=True):
    """The shape of a worker's KV blocks; sender and receiver must agree exactly."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def mismatch(self, other: KvLayout) -> str | None:
        """A readable list of differences, or None when the layouts are the same."""
        diffs = [
            f"{f}: {getattr(self, f)} vs {getattr(other, f)}"
            for f in self.__struct_fields__
            if getattr(self, f) != getattr(other, f)
        ]
        return "; ".join(diffs) or None
