"""Whether reading blocks up from disk or shared storage beats recomputing them.

Loading is what the tiers are for, but it is not always faster: shared storage at 1 GB/s
takes ~2 ms for a Llama-3-8B block of 2 MiB, which a GPU recomputes in well under a
millisecond; a slow network disk is no better. Such a read makes the request's first token
later than recomputing would. The stack asks a `LoadCosts` before it plans reads from a tier
below the host (host-memory loads are always taken: a copy at tens of GB/s), and leaves that
tier's blocks to be recomputed while reading them costs more than computing them.

Two estimators:

* `ModelLoadCosts`: the costs from a timing model (the mocker's: its load and prefill
  parameters), fixed.
* `MeasuredLoadCosts`: moving averages of what the worker measured: each tier's read time per
  block (a load's reads from that tier, wall time over blocks), and the engine's prefill time
  per token (steps that prefill; their decode rows count too, so recompute is overestimated,
  erring toward reading). Until both are known a tier is read. A tier judged too slow is still
  read once every `PROBE_EVERY` decisions, so its estimate follows the storage and the GPU's
  load (a busier engine prefills slower and makes reads worth it again).

Recompute is costed per block on average: attention makes blocks deep in a long context dearer
to recompute than that, so long prompts are the ones that may still be read when the average
says no; the measured estimator sees those in its prefill times.
"""

from __future__ import annotations

from typing import Protocol

PROBE_EVERY = 32
"""A tier judged slower than recompute is still read on one decision in this many."""
EWMA_WEIGHT = 0.2
"""How much one measurement moves an average (recent ones dominate after ~10)."""


class LoadCosts(Protocol):
    """Per-tier read cost against recompute, in milliseconds per block."""

    def worth_reading(self, medium: str) -> bool:
        """Read ``medium``'s blocks for this prompt (False: recompute them)."""
        ...

    def observe_read(self, medium: str, blocks: int, seconds: float) -> None:
        """A load read ``blocks`` from ``medium`` in ``seconds`` of wall time."""
        ...


class ModelLoadCosts:
    """Fixed costs from a timing model: ``read_ms`` per tier and block, ``recompute_ms`` per
    block."""

    def __init__(self, read_ms: dict[str, float], recompute_ms: float) -> None:
        self.read_ms = dict(read_ms)
        self.recompute_ms = recompute_ms

    def worth_reading(self, medium: str) -> bool:
        cost = self.read_ms.get(medium)
        return cost is None or cost <= self.recompute_ms

    def observe_read(self, medium: str, blocks: int, seconds: float) -> None:
        """The model's costs do not move."""


class MeasuredLoadCosts:
    """Moving averages of measured reads and prefills (see the module docstring)."""

    def __init__(self, block_size: int, probe_every: int = PROBE_EVERY) -> None:
        if block_size < 1 or probe_every < 1:
            raise ValueError("block_size and probe_every must be at least 1")
        self.block_size = block_size
        self.probe_every = probe_every
        self.read_ms: dict[str, float] = {}  # per tier: ms per block
        self.prefill_ms_per_token: float | None = None
        self._declined: dict[str, int] = {}  # per tier: decisions against reading in a row

    @property
    def recompute_ms(self) -> float | None:
        per_token = self.prefill_ms_per_token
        return None if per_token is None else per_token * self.block_size

    def worth_reading(self, medium: str) -> bool:
        cost, recompute = self.read_ms.get(medium), self.recompute_ms
        if cost is None or recompute is None or cost <= recompute:
            self._declined.pop(medium, None)
            return True
        declined = self._declined.get(medium, 0) + 1
        if declined >= self.probe_every:  # read this once: the estimate may be stale
            self._declined.pop(medium, None)
            return True
        self._declined[medium] = declined
        return False

    def observe_read(self, medium: str, blocks: int, seconds: float) -> None:
        if blocks > 0 and seconds >= 0:
            self.read_ms[medium] = _ewma(self.read_ms.get(medium), seconds * 1000 / blocks)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A step computed ``tokens`` prompt tokens (and maybe decode rows) in ``seconds``."""
        if tokens > 0 and seconds >= 0:
            self.prefill_ms_per_token = _ewma(self.prefill_ms_per_token, seconds * 1000 / tokens)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA_WEIGHT * (new - old)
