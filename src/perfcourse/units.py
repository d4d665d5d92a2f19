"""Units for every displayed number: durations, sizes, ratios, rates, and tables that show them.

Every number the course *displays* carries a unit (``850 µs``, ``12.3 MB``, ``5.3x``): the
notebooks' output checks mask exactly such numbers, so a figure without a unit would make a
notebook fail on the next run.
"""


from __future__ import annotations

import math

import pandas as pd

__all__ = [
    "BYTE_UNITS",
    "TIME_UNITS",
    "format_bytes",
    "format_duration",
    "format_rate",
    "format_ratio",
    "format_table",
    "time_unit",
]

# ---------------------------------------------------------------------------------------------
# Formatting: every displayed number carries a unit
# ---------------------------------------------------------------------------------------------

#: (unit name, seconds per unit), smallest first.
TIME_UNITS = (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0))


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit in which ``seconds`` reads best: ``("ms", 1e-3)`` for 0.0123.

    Used to scale a whole column or axis at once (:mod:`perfcourse.plots`).
    """
    seconds = abs(seconds)
    for name, size in reversed(TIME_UNITS):
        if seconds >= size:
            return name, size
    return TIME_UNITS[0]


def _three_digits(value: float) -> str:
    # 3 significant digits, no exponent: 1.23, 12.3, 123
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_duration(seconds: float) -> str:
    """A duration with a unit and 3 significant digits: ``"850 µs"``, ``"1.23 ms"``, ``"2.10 s"``.

    Durations of a minute or more read ``"2.5 min"``; ``None``/NaN read ``"n/a"``.
    """
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    sign = "-" if seconds < 0 else ""
    seconds = abs(float(seconds))
    if seconds >= 60:
        return f"{sign}{seconds / 60:.1f} min"
    if seconds == 0:
        return "0 s"
    name, size = time_unit(seconds)
    value = seconds / size
    if round(value, 2 if value < 10 else 1 if value < 100 else 0) >= 1000 and name != "s":
        # 999.7 µs rounds to "1000 µs": show the next unit instead
        name, size = TIME_UNITS[[u for u, _ in TIME_UNITS].index(name) + 1]
        value = seconds / size
    return f"{sign}{_three_digits(value)} {name}"


#: Decimal (SI) units, as disk and network vendors use them: 1 KB = 1000 bytes.
BYTE_UNITS = (("B", 1), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))


def format_bytes(n: float) -> str:
    """A size in decimal units with one decimal: ``"512 B"``, ``"12.3 KB"``, ``"1.5 GB"``.

    The course uses SI units throughout (1 KB = 1000 bytes, 1 MB = 10^6 bytes).
    """
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    if n < 1000:
        return f"{sign}{n:.0f} B"
    for name, size in BYTE_UNITS[1:]:
        if round(n / size, 1) < 1000 or name == BYTE_UNITS[-1][0]:
            return f"{sign}{n / size:.1f} {name}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_ratio(x: float) -> str:
    """A ratio with one decimal and an ``x``: ``"12.3x"`` (how many times slower or bigger)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.1f}x"


def format_rate(per_second: float, unit: str = "req/s") -> str:
    """``1234.5`` -> ``"1,234 req/s"``: a throughput, in the form the nbval sanitizer masks."""
    return f"{per_second:,.0f} {unit}"


def format_table(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of a results table with every measured number as text with its unit.

    Columns ending in ``_per_s`` become rates (``"1,234 req/s"``), in ``_s`` durations
    (``"1.23 ms"``), in ``_bytes`` sizes (``"12.3 MB"``), ``ratio`` becomes ``"12.3x"``; the suffix
    is dropped from the column name since the unit is now in the value (``median_s`` ->
    ``median``, ``throughput_per_s`` -> ``throughput``). Other columns are kept.
    Show this in notebooks, never the raw floats: their digits change on every run.
    """
    out = df.copy()
    renames = {}
    for column in out.columns:
        name = str(column)
        if name.endswith("_per_s"):
            out[column] = out[column].map(format_rate)
            renames[column] = name[: -len("_per_s")]
        elif name.endswith("_s"):
            out[column] = out[column].map(format_duration)
            renames[column] = name[:-2]
        elif name.endswith("_bytes"):
            out[column] = out[column].map(format_bytes)
            renames[column] = name[: -len("_bytes")]
        elif name == "ratio" or name.endswith("_ratio"):
            out[column] = out[column].map(format_ratio)
    return out.rename(columns=renames)


