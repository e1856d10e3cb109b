"""When a decode worker sends a prompt to a prefill worker (conditional disaggregation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Decision = Literal["remote", "local_short", "local_queue_full"]


@dataclass(frozen=True)
class DisaggConfig:
    """A decode worker's disaggregation knobs (its YAML section's keys of the same names,
    `worker/config.py`).

    Prefill remotely only when the prompt's tokens not already cached here exceed
    ``max_local_prefill_length`` (short prefills cost less than a transfer) and fewer than
    ``max_prefill_queue_size`` requests wait in the prefill queue (a deep queue means the
    prefill workers are the bottleneck: computing here is faster). ``prefill_timeout``: seconds
    to wait for the KV before prefilling locally after all.
    """

    remote_prefill: bool = False
    max_local_prefill_length: int = 512
    max_prefill_queue_size: int = 4
    prefill_timeout: float = 30.0

    def decide(self, uncached_tokens: int, queue_depth: int) -> Decision:
        if uncached_tokens <= self.max_local_prefill_length:
            return "local_short"
        if queue_depth >= self.max_prefill_queue_size:
            return "local_queue_full"
        return "remote"
