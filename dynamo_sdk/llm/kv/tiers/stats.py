"""Per-tier usage and totals of a worker's KV tiers (no dependencies: `EngineStats` has them)."""

from __future__ import annotations

import msgspec


class KvTierStats(msgspec.Struct, kw_only=True):
    """One tier's usage and totals since start (what metrics and the log line report)."""

    medium: str
    enabled: bool = True
    capacity_blocks: int = 0  # 0: no limit the worker knows (shared storage)
    used_blocks: int = 0
    hit_tokens: int = 0  # prompt tokens loaded from this tier instead of recomputed
    offload_blocks: int = 0
    offload_bytes: int = 0
    onboard_blocks: int = 0
    onboard_bytes: int = 0
    evicted_blocks: int = 0
    skipped_blocks: int = 0  # not copied in: every slot was busy (a backlog of writes below)
    corrupt_blocks: int = 0  # failed their checks on load: deleted, recomputed
    errors: int = 0  # store operations that failed
    declined_loads: int = 0  # prompts whose blocks here were recomputed: reading was slower
    load_seconds: float = 0.0  # time spent loading from this tier, summed over loads
    loads: int = 0
