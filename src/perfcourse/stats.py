"""Statistics of measured samples: one percentile definition for the whole course."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["percentile", "percentiles", "summarize_latencies"]


def percentile(samples: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, interpolating linearly between ranks.

    The same definition as ``numpy.percentile``'s default: sort, find position
    ``(n - 1) * q / 100``, interpolate between its two neighbours. ``p50`` is the median.
    """
    return percentiles(samples, (q,))[0]


def percentiles(samples: Iterable[float], qs: Sequence[float]) -> list[float]:
    """Several percentiles of ``samples`` with one sort (see :func:`percentile`)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("percentile() of no samples: pass at least one value.")
    values = []
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"q must be between 0 and 100, got {q!r}.")
        position = (len(ordered) - 1) * q / 100
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        values.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return values


def summarize_latencies(samples_s: Sequence[float]) -> dict[str, float]:
    """``requests, mean_s, p50_s, p90_s, p99_s, max_s`` of latencies in seconds (a table row)."""
    values = [float(v) for v in samples_s]
    p50, p90, p99 = percentiles(values, (50, 90, 99))
    return {
        "requests": len(values),
        "mean_s": math.fsum(values) / len(values),
        "p50_s": p50,
        "p90_s": p90,
        "p99_s": p99,
        "max_s": max(values),
    }
