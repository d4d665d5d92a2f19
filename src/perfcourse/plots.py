"""The course's plot style and the three plots every chapter needs.

>>> use_course_style()                              # once, in the setup cell
>>> ax = bar_cases(bench.run(n=100))               # one bar per case, "1.23 ms" on each
>>> ax = lines_over(df, x="n", y="median_s", hue="strategy", logy=True)
>>> ax = histogram_latency(samples_s)               # with p50/p95/p99 lines
>>> plt.show()

Columns ending in ``_s`` are seconds and ``_bytes`` are bytes: axes are scaled to a readable
unit (ms, µs, MB...) named in the axis label, and bar annotations carry their unit. Every
function draws on ``ax`` when given (else on a new figure) and returns the Axes; none calls
``plt.show()``: end the notebook cell with it, so the cell's text output stays stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.axes import Axes

from .stats import percentile
from .units import BYTE_UNITS, format_bytes, format_duration, format_rate, format_ratio, time_unit

__all__ = ["use_course_style", "COURSE_STYLE", "COLORS", "bar_cases", "lines_over",
           "histogram_latency"]

#: Okabe-Ito: distinguishable with every common colour-vision deficiency.
COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
          "#000000"]

COURSE_STYLE: dict[str, Any] = {
    "figure.figsize": (7, 4),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.axisbelow": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=COLORS),
    "lines.linewidth": 2,
    "lines.markersize": 6,
}


def use_course_style() -> None:
    """Apply the course's matplotlib style (readable sizes, light grid, 7x4 inch figures)."""
    mpl.rcParams.update(COURSE_STYLE)


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------


def _kind(column: str) -> str:
    if column.endswith("_per_s"):
        return "rate"
    if column.endswith("_s"):
        return "time"
    if column.endswith("_bytes"):
        return "bytes"
    return "plain"


def _scale(values: Sequence[float], kind: str) -> tuple[str, float]:
    """(unit, divisor) in which ``values`` read best."""
    finite = [abs(v) for v in values if v is not None and np.isfinite(v)]
    largest = max(finite, default=0.0)
    if kind == "time":
        return time_unit(largest) if largest else ("s", 1.0)
    if kind == "bytes":
        unit, size = BYTE_UNITS[0]
        for name, factor in BYTE_UNITS:
            if largest >= factor:
                unit, size = name, factor
        return unit, size
    if kind == "rate":
        return "per s", 1.0
    return "", 1.0


def _format(value: float, kind: str) -> str:
    if kind == "time":
        return format_duration(value)
    if kind == "bytes":
        return format_bytes(value)
    if kind == "rate":
        return format_rate(value, "/s")
    return f"{value:g}"


def _axis_label(column: str, unit: str) -> str:
    name = column
    for suffix in ("_per_s", "_s", "_bytes"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = name.replace("_", " ")
    if column.endswith("_s") and not column.endswith("_per_s"):
        name = f"{name} time" if name in ("min", "median", "mean", "p95", "p99", "max") else name
    return f"{name} ({unit})" if unit else name


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        _, ax = plt.subplots()
    return ax


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def bar_cases(
    df: pd.DataFrame,
    value: str = "median_s",
    *,
    label: str = "case",
    error: str | None = None,
    annotate: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """One horizontal bar per row (first row on top), e.g. a :class:`~perfcourse.timing.Benchmark`
    table. The value axis is scaled to a unit named in its label; each bar is annotated with
    its value (``"1.23 ms"``) and, when the table has a ``ratio`` column, the ratio
    (``"12.3x"``). ``error`` names a column drawn as error bars (e.g. ``"stdev_s"``).
    """
    ax = _axes(ax)
    kind = _kind(value)
    unit, size = _scale(df[value].tolist(), kind)
    values = df[value].to_numpy(dtype=float) / size
    errors = df[error].to_numpy(dtype=float) / size if error else None
    positions = np.arange(len(df))
    ax.barh(positions, values, xerr=errors, color=COLORS[0], capsize=3 if error else 0)
    ax.set_yticks(positions, [str(v) for v in df[label]])
    ax.invert_yaxis()  # registration order, read top to bottom
    ax.set_xlabel(_axis_label(value, unit))
    ax.grid(axis="y", visible=False)
    if annotate:
        ends = values + (np.nan_to_num(errors) if errors is not None else 0)  # past error bars
        for position, (raw, end) in enumerate(zip(df[value], ends, strict=True)):
            text = _format(raw, kind)
            if "ratio" in df.columns:
                text += f"  ({format_ratio(df['ratio'].iloc[position])})"
            ax.annotate(text, (end, position), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize="small")
        ax.margins(x=0.35)  # room for the annotations
    if title:
        ax.set_title(title)
    return ax


def lines_over(
    df: pd.DataFrame,
    x: str,
    y: str = "median_s",
    hue: str | None = None,
    *,
    logx: bool = False,
    logy: bool = False,
    marker: str = "o",
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """``y`` against a parameter ``x``, one line per value of ``hue`` (in order of appearance),
    e.g. time against N per loading strategy. ``y`` is scaled to a unit named in its label;
    ``logx``/``logy`` switch to log scales (growth rates: O(n) vs O(n^2) become slopes)."""
    ax = _axes(ax)
    kind = _kind(y)
    unit, size = _scale(df[y].tolist(), kind)
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=False))
    for name, group in groups:
        group = group.sort_values(x)
        ax.plot(group[x], group[y].to_numpy(dtype=float) / size, marker=marker,
                label=None if name is None else str(name))
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(_axis_label(y, unit))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if hue is not None:
        ax.legend(title=hue.replace("_", " "))
    if title:
        ax.set_title(title)
    return ax


def histogram_latency(
    samples_s: Sequence[float],
    percentiles: Sequence[float] = (50, 95, 99),
    *,
    bins: int = 50,
    logx: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """A histogram of latencies (seconds) with a vertical line per percentile, labelled
    ``p95 = 12.3 ms``. Why percentiles: the mean hides the slow tail that users feel."""
    ax = _axes(ax)
    samples = np.asarray(samples_s, dtype=float)
    if samples.size == 0:
        raise ValueError("No latency samples to plot: pass a list of durations in seconds.")
    unit, size = _scale([percentile(samples, max(percentiles, default=100))], "time")
    scaled = samples / size
    if logx:
        low = max(scaled[scaled > 0].min(initial=np.inf), 1e-12)
        edges = np.geomspace(low, max(scaled.max(), low * 1.0001), bins + 1)
        ax.set_xscale("log")
    else:
        edges = bins
    ax.hist(scaled, bins=edges, color=COLORS[0], alpha=0.75)
    styles = ["--", "-.", ":", (0, (5, 1))]
    for i, p in enumerate(percentiles):
        value = percentile(samples, p)
        ax.axvline(value / size, color=COLORS[(i + 1) % len(COLORS)],
                   linestyle=styles[i % len(styles)], linewidth=2,
                   label=f"p{p:g} = {format_duration(value)}")
    ax.set_xlabel(f"latency ({unit})")
    ax.set_ylabel("requests")
    if len(percentiles):
        ax.legend()
    if title:
        ax.set_title(title)
    return ax
