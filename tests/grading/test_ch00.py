"""Graders of chapter 00 (setup and dataset): right answers pass, typical wrong ones get a hint
that names the mistake."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

from perfcourse.grading.bank import question

from .kit import fails, passes

ROOT = Path(__file__).resolve().parents[2]
MASTER = ROOT / "solutions" / "00-setup-and-dataset.ipynb"

# --- choice questions ---------------------------------------------------------------------

RIGHT_KEYS = {"00.q1": "c", "00.q2": "d"}


@pytest.mark.parametrize("qid", sorted(RIGHT_KEYS))
@pytest.mark.parametrize("form", ["upper", "spaced"])
def test_right_key_passes_in_any_form(qid, form):
    key = RIGHT_KEYS[qid]
    passes(qid, key.upper() if form == "upper" else f" {key} ")


WRONG_KEYS = [
    ("00.q1", "a", ("PostgreSQL", "has to start first")),
    ("00.q1", "b", ("seeded again", "in-memory")),
    ("00.q1", "d", ("Redis", "cache and queue")),
    ("00.q2", "a", ("nbval", "your own timings")),
    ("00.q2", "b", ("score table", "fresh kernel")),
    ("00.q2", "c", ("not saved", "save first")),
]


@pytest.mark.parametrize("qid, key, hint", WRONG_KEYS, ids=[f"{q}-{k}" for q, k, _ in WRONG_KEYS])
def test_wrong_key_fails_with_its_explanation(qid, key, hint):
    fails(qid, key, *hint)


# --- 00.q3 mean_latency_ms ----------------------------------------------------------------


def mean_with_fmean(samples_s):
    return statistics.fmean(samples_s) * 1000


def mean_with_numpy(samples_s):
    return float(np.mean(np.asarray(samples_s)) * 1000)


def mean_by_loop(samples_s):
    total = math.fsum(s * 1000 for s in samples_s)
    return total / len(samples_s)


@pytest.mark.parametrize("answer", [mean_with_fmean, mean_with_numpy, mean_by_loop],
                         ids=lambda f: f.__name__)
def test_q3_other_right_answers_pass(answer):
    passes("00.q3", answer)


def mean_in_seconds(samples_s):
    return sum(samples_s) / len(samples_s)


def divided_by_1000(samples_s):
    return sum(samples_s) / len(samples_s) / 1000


def total_not_mean(samples_s):
    return sum(samples_s) * 1000


def off_by_one(samples_s):
    return sum(samples_s) / max(len(samples_s) - 1, 1) * 1000


def median_not_mean(samples_s):
    return statistics.median(samples_s) * 1000


def visible_example_copied(samples_s):
    return 300.0  # the notebook's example, mean_latency_ms([0.1, 0.2, 0.6])


def no_return(samples_s):
    sum(samples_s) / len(samples_s) * 1000


WRONG_MEANS = [
    (mean_in_seconds, ("mean in seconds", "multiply by 1000")),
    (divided_by_1000, ("do not divide",)),
    (total_not_mean, ("total", "divide by the number of samples")),
    (off_by_one, ("off by one", "len(samples_s)")),
    (median_not_mean, ("median",)),
    (visible_example_copied, ("expected 250",)),
    (no_return, ("returned None", "return")),
]


@pytest.mark.parametrize("answer, hint", WRONG_MEANS, ids=[f.__name__ for f, _ in WRONG_MEANS])
def test_q3_wrong_answers_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("00.q3", answer, *hint)


def test_q3_needs_a_function():
    fails("00.q3", 250.0, "function itself")


def test_q3_the_untouched_stub_is_not_written_yet():
    def mean_latency_ms(samples_s):
        """The mean of durations given in seconds, in milliseconds."""
        raise NotImplementedError("Your code here")

    fails("00.q3", mean_latency_ms, "not written yet")


@pytest.mark.parametrize("function", ["percentile", "percentiles", "summarize_latencies"])
def test_q3_no_platform_statistic_passes(function):
    from perfcourse import stats

    fails("00.q3", getattr(stats, function))


def test_q3_the_visible_example_holds():
    from perfcourse.grading.questions.ch00 import _latency_samples, _mean_latency_ms

    assert _mean_latency_ms([0.1, 0.2, 0.6]) == pytest.approx(300.0)
    seed = question("00.q3").checker.seed
    assert [0.1, 0.2, 0.6] not in list(_latency_samples(random.Random(seed)))
