"""Helpers every benchmark script shares: percentiles, JSON output, profiling, Ctrl-C.

The scripts run as `python benchmarks/NAME.py`, so this module is found beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import math
import signal
from collections.abc import Awaitable, Iterable, Iterator
from pathlib import Path
from typing import Any


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of `values` in any order (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(pct / 100.0 * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


def json_safe(obj: Any) -> Any:
    """NaN (an empty cell) as null: strict JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


@contextlib.contextmanager
def profiled(profile_dir: Path | None, name: str) -> Iterator[None]:
    """cProfile the block into `profile_dir/name.prof` (no-op without a directory)."""
    if profile_dir is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profile_dir.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(profile_dir / f"{name}.prof"))


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of positive integers (``1,8,32``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,8,32, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


async def run_all(coros: Iterable[Awaitable[Any]], timeout: float, what: str = "tasks") -> None:
    """Run ``coros`` concurrently; all must finish within ``timeout`` seconds (else the rest
    are cancelled and TimeoutError raised); the first failure is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            raise TimeoutError(
                f"{len(pending)} of {len(tasks)} {what} still running after {timeout:.0f} s"
            )
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so the scripts' cleanup of children and servers runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
