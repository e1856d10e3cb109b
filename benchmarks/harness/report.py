"""Aligned text tables and the targets table every benchmark prints.

A target is one row: what is promised (its name), what was measured, the unit, and PASS, MISS
or SKIP (SKIP: a cell it needs was not run). `check()` builds one from a value and a predicate;
`format_targets()` prints them aligned, `table()` any other header + rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Target:
    name: str
    value: float | None
    unit: str
    passed: bool | None  # None: a cell it needs was not run
    detail: str = ""
    digits: int | None = None  # None: 3 for ms, 2 for ratios (x), 0 otherwise


def check(
    name: str,
    value: float | None,
    unit: str,
    ok: Callable[[float], bool],
    detail: str = "",
    digits: int | None = None,
) -> Target:
    """A target row: `ok(value)` decides PASS/MISS; no value (or NaN) is SKIP."""
    if value is not None and isinstance(value, float) and math.isnan(value):
        value = None
    passed = None if value is None else bool(ok(value))
    return Target(name, value, unit, passed, detail, digits)


def fmt(value: float | None, digits: int) -> str:
    """`value` with thousands separators, or n/a for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Lines of an aligned table: the first `left` columns left-justified, the rest right."""
    rows = [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in [tuple(header), *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _digits(t: Target) -> int:
    if t.digits is not None:
        return t.digits
    return 3 if t.unit == "ms" else 2 if t.unit == "x" else 0


def format_targets(targets: Sequence[Target], title: str = "targets:") -> list[str]:
    """The targets block: `  name  value unit  PASS  (detail)`, aligned."""
    if not targets:
        return []
    values = ["not run" if t.value is None else fmt(t.value, _digits(t)) for t in targets]
    units = ["" if t.value is None else t.unit for t in targets]
    name_w = max(len(t.name) for t in targets)
    value_w = max(len(v) for v in values)
    unit_w = max(len(u) for u in units)
    out = [title]
    for t, value, unit in zip(targets, values, units, strict=True):
        verdict = {True: "PASS", False: "MISS", None: "SKIP"}[t.passed]
        detail = f"  ({t.detail})" if t.detail else ""
        out.append(
            f"  {t.name.ljust(name_w)}  {value.rjust(value_w)} {unit.ljust(unit_w)}  "
            f"{verdict}{detail}"
        )
    return out


def summary(targets: Sequence[Target]) -> str:
    """`3 PASS, 1 MISS, 0 SKIP`."""
    counts = {v: sum(t.passed is k for t in targets) for k, v in _VERDICTS}
    return ", ".join(f"{n} {v}" for v, n in counts.items())


_VERDICTS = ((True, "PASS"), (False, "MISS"), (None, "SKIP"))
