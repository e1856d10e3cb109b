"""PNGs for the benchmarks, only when matplotlib is installed (the tables never need it).

`pyplot()` hands out matplotlib's pyplot on the Agg backend (None without matplotlib) for
custom figures; `plot_panels()` draws side-by-side panels of labelled line or step series, which
is all most benchmarks plot, and `save()` writes and closes a figure.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def pyplot() -> Any | None:
    """matplotlib.pyplot on the non-interactive Agg backend, or None if not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: dict[str, Any] = field(default_factory=lambda: {"marker": "o"})


@dataclass
class Panel:
    series: list[Series]
    xlabel: str = ""
    ylabel: str = ""
    title: str = ""
    kind: str = "line"  # line | step (a CDF) | bar (series side by side at each x)
    xscale: str = "linear"
    yscale: str = "linear"
    grid: bool = False
    xticks: Sequence[float] | None = None
    xtick_labels: Sequence[str] | None = None  # with xticks, or one per bar position
    legend_size: float | None = None
    legend_loc: str = "best"


def save(fig: Any, path: Path, dpi: int = 110) -> str:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    if plt is not None:
        plt.close(fig)
    return str(path)


def plot_panels(
    path: Path,
    panels: Sequence[Panel],
    suptitle: str | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 110,
) -> str | None:
    """Draw `panels` side by side into `path`; the path written, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=size or (5.5 * len(panels), 4.2))
    if len(panels) == 1:
        axes = [axes]
    for ax, panel in zip(axes, panels, strict=True):
        _draw(ax, panel)
    if suptitle:
        fig.suptitle(suptitle)
    return save(fig, path, dpi)


def _draw(ax: Any, panel: Panel) -> None:
    if panel.kind == "bar":
        positions = sorted({x for s in panel.series for x in s.xs})
        width = 0.8 / max(len(panel.series), 1)
        for i, s in enumerate(panel.series):
            offsets = [positions.index(x) + (i - (len(panel.series) - 1) / 2) * width for x in s.xs]
            ax.bar(
                offsets,
                s.ys,
                width,
                label=s.label,
                **{k: v for k, v in s.style.items() if k != "marker"},
            )
        labels = panel.xtick_labels or [f"{x:g}" for x in positions]
        ax.set_xticks(range(len(positions)), list(labels))
    else:
        for s in panel.series:
            if panel.kind == "step":
                ax.step(s.xs, s.ys, where="post", label=s.label)
            else:
                ax.plot(s.xs, s.ys, label=s.label, **s.style)
        ax.set_xscale(panel.xscale)  # before the ticks: setting a scale resets them
        if panel.xticks is not None:
            labels = panel.xtick_labels or [f"{x:g}" for x in panel.xticks]
            ax.set_xticks(list(panel.xticks), list(labels))
            ax.set_xticks([], minor=True)
    yscale = panel.yscale
    if yscale == "log" and not any(y > 0 for s in panel.series for y in s.ys if math.isfinite(y)):
        yscale = "linear"  # nothing measured (a failed run): an empty panel, not a crash
    ax.set_yscale(yscale)
    if yscale == "log":  # 1, 2, 5, 10, 20, 50 rather than 2x10^0, 5x10^0, 10^1
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.title:
        ax.set_title(panel.title)
    if panel.grid:
        ax.grid(True, which="both", alpha=0.3)
    if any(s.label for s in panel.series):
        ax.legend(fontsize=panel.legend_size, loc=panel.legend_loc)
