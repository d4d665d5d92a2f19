"""Tests of perfcourse.plots: the right number of bars and lines, and units in every label."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from perfcourse import plots
from perfcourse.timing import Timing, timings_table


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _bench_table() -> pd.DataFrame:
    return timings_table([
        Timing.from_samples("Lazy loading (N+1)", [0.0120, 0.0125, 0.0130]),
        Timing.from_samples("selectinload", [0.0010, 0.0011, 0.0012]),
        Timing.from_samples("joinedload", [0.0015, 0.0016, 0.0017]),
    ])


def test_use_course_style():
    with matplotlib.rc_context():
        plots.use_course_style()
        assert tuple(matplotlib.rcParams["figure.figsize"]) == (7, 4)
        assert matplotlib.rcParams["axes.spines.top"] is False
        assert matplotlib.rcParams["axes.grid"] is True
        assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0] == plots.COLORS[0]


def test_bar_cases_scales_to_milliseconds_and_annotates():
    df = _bench_table()
    ax = plots.bar_cases(df, error="stdev_s", title="Loading 100 orders")
    assert isinstance(ax, matplotlib.axes.Axes)
    assert len(ax.patches) == 3
    assert ax.get_xlabel() == "median time (ms)"
    assert [t.get_text() for t in ax.get_yticklabels()] == list(df["case"])
    widths = [patch.get_width() for patch in ax.patches]
    assert widths == pytest.approx([12.5, 1.1, 1.6])  # in ms
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == "12.5 ms  (11.4x)"
    assert texts[1] == "1.10 ms  (1.0x)"
    assert ax.get_title() == "Loading 100 orders"


def test_bar_cases_bytes_and_microseconds():
    df = pd.DataFrame({"case": ["list", "generator"], "peak_bytes": [45_000_000, 12_000]})
    ax = plots.bar_cases(df, "peak_bytes")
    assert ax.get_xlabel() == "peak (MB)"
    assert [t.get_text() for t in ax.texts] == ["45.0 MB", "12.0 KB"]

    fast = pd.DataFrame({"case": ["get"], "median_s": [0.000085]})
    ax = plots.bar_cases(fast)
    assert ax.get_xlabel() == "median time (µs)"
    assert ax.texts[0].get_text() == "85.0 µs"


def test_lines_over_one_line_per_strategy():
    rows = [
        {"n": n, "strategy": strategy, "median_s": factor * n * 1e-4}
        for strategy, factor in (("lazy", 10), ("selectin", 1), ("joined", 2))
        for n in (10, 100, 1000)
    ]
    ax = plots.lines_over(pd.DataFrame(rows), x="n", y="median_s", hue="strategy",
                          logx=True, logy=True)
    lines = ax.get_lines()
    assert len(lines) == 3
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [
        "lazy", "selectin", "joined"]
    assert ax.get_ylabel() == "median time (s)"  # largest value: 1 s
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert list(lines[0].get_xdata()) == [10, 100, 1000]

    single = plots.lines_over(pd.DataFrame(rows[3:6]), x="n")  # selectin: up to 100 ms
    assert len(single.get_lines()) == 1 and single.get_legend() is None
    assert single.get_ylabel() == "median time (ms)"


def test_histogram_latency_percentile_lines():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=np.log(0.002), sigma=0.5, size=2000)
    ax = plots.histogram_latency(samples)
    assert len(ax.get_lines()) == 3  # p50, p95, p99
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [label.split(" = ")[0] for label in labels] == ["p50", "p95", "p99"]
    assert all(label.endswith(" ms") for label in labels)
    assert ax.get_xlabel() == "latency (ms)"
    assert len(ax.patches) == 50

    logged = plots.histogram_latency(samples, percentiles=(99.9,), logx=True, bins=20)
    assert len(logged.get_lines()) == 1 and logged.get_xscale() == "log"
    assert logged.get_legend().get_texts()[0].get_text().startswith("p99.9 = ")
    with pytest.raises(ValueError, match="seconds"):
        plots.histogram_latency([])


def test_draws_on_a_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    assert plots.bar_cases(_bench_table(), ax=left) is left
    assert plots.histogram_latency([0.001, 0.002, 0.003], ax=right) is right


def test_rates_are_not_durations():
    import pandas as pd

    from perfcourse.plots import bar_cases, lines_over

    df = pd.DataFrame({"case": ["1 worker", "2 workers"], "throughput_per_s": [120.0, 240.0],
                       "workers": [1, 2]})
    ax = bar_cases(df, value="throughput_per_s")
    assert ax.get_xlabel() == "throughput (per s)"
    assert [t.get_text() for t in ax.texts] == ["120 /s", "240 /s"]
    ax = lines_over(df, x="workers", y="throughput_per_s")
    assert ax.get_ylabel() == "throughput (per s)"
