"""Chapter 00, setup and dataset: how the course runs and how grading works."""

from __future__ import annotations

import copy
import inspect
import numbers
import random
import statistics
from dataclasses import dataclass

from ..bank import Question
from ..checkers import (
    NOT_WRITTEN,
    Checker,
    Choice,
    Incorrect,
    NoAnswer,
    call_learner,
    is_unwritten,
    need_function,
    short_repr,
    values_equal,
)

__all__ = [
    "QUESTIONS",
]


def _mean_latency_ms(samples_s):
    return sum(samples_s) / len(samples_s) * 1000


def _latency_samples(rng):
    yield [0.25]  # one sample
    yield [0.1, 0.2, 0.3]
    yield [0.001] * 7  # ties
    yield [0.004, 0.002, 0.9]  # a slow outlier: mean and median differ
    for _ in range(10):
        yield [rng.uniform(0.0005, 2.0) for _ in range(rng.randint(2, 50))]


#: Answers a learner gets by a typical slip, and the hint that names it (checked in this order).
_MEAN_SLIPS = (
    (lambda s: sum(s) / len(s), "that is the mean in seconds: multiply by 1000 for milliseconds."),
    (lambda s: sum(s) / len(s) / 1000, "1 s is 1000 ms: multiply the seconds by 1000, do not divide."),
    (lambda s: sum(s) * 1000, "that is the total, not the mean: divide by the number of samples."),
    (lambda s: sum(s) / (len(s) - 1) * 1000 if len(s) > 1 else None,
     "off by one: divide by len(samples_s), not len(samples_s) - 1."),
    (lambda s: statistics.median(s) * 1000, "that is the median: the exercise asks for the mean."),
)


@dataclass
class _MeanLatencyCheck(Checker):
    """``mean_latency_ms(samples_s)`` on hidden lists, with a hint naming the usual slips."""

    seed: int = 20240100

    def grade(self, answer):
        need_function(answer, 'check("00.q3", mean_latency_ms)')
        if is_unwritten(answer):
            raise NoAnswer(NOT_WRITTEN)
        for samples in _latency_samples(random.Random(self.seed)):
            expected = _mean_latency_ms(samples)
            given = copy.deepcopy(samples)
            got = call_learner(answer, given)
            shown = short_repr(samples, 70)
            if got is None:
                raise Incorrect(f"Your function returned None for {shown}: did you forget `return`?")
            if isinstance(got, bool) or not isinstance(got, numbers.Real):
                raise Incorrect(f"Return a number of milliseconds (got a {type(got).__name__} for {shown}).")
            if values_equal(float(got), expected):
                continue
            for slip, hint in _MEAN_SLIPS:
                wrong = slip(samples)
                if wrong is not None and values_equal(float(got), wrong):
                    raise Incorrect(f"For {shown} you returned {float(got):.10g}: {hint}")
            raise Incorrect(f"For {shown} your function returned {float(got):.10g}, expected {expected:.10g} ms.")

    def model_answer(self):
        return inspect.getsource(_mean_latency_ms)


QUESTIONS = [
    Question(
        id="00.q1",
        title="The default backend",
        checker=Choice(
            options={
                "a": "The embedded PostgreSQL server, started under data/ on first use",
                "b": "An in-memory SQLite database, rebuilt each time the kernel starts",
                "c": "A SQLite file under data/, seeded once and reused by every notebook",
                "d": "Redis, which the course starts on demand as its shared data store",
            },
            correct="c",
            explanations={
                "a": "The embedded PostgreSQL server is used when you ask for it "
                "(dataset(\"postgres\") or DATABASE_URL); it is not the default because it has "
                "to start first.",
                "b": "An in-memory copy would be seeded again in every kernel, minutes at the "
                "small scale; the default is a file that is seeded once (the graders use "
                "in-memory copies, not your notebooks).",
                "d": "Redis is the course's cache and queue (chapters 05 and 06), not where the "
                "shop tables live.",
            },
        ),
        explanation="SQLite needs no server, so it always works, on a laptop and in Binder; the "
        "file is seeded once (idempotent) and shared by every notebook. PostgreSQL (embedded or "
        "DATABASE_URL) is one argument away when a chapter compares both.",
    ),
    Question(
        id="00.q2",
        title="How to grade a notebook",
        checker=Choice(
            options={
                "a": "Run `pytest --nbval` on the notebook: it reports one result per cell",
                "b": "Run all cells in Jupyter: the last cell prints the score table",
                "c": "Run `perfcourse grade` on it: it also grades your unsaved edits",
                "d": "Save it, then run `perfcourse grade` on the saved notebook file",
            },
            correct="d",
            explanations={
                "a": "Strict nbval compares every output with the stored one, so your own "
                "timings would fail; `perfcourse grade` runs the checks and prints a score table.",
                "b": "Each check cell tells you right or wrong, but the score table comes from "
                "`perfcourse grade`, which runs the whole saved notebook in a fresh kernel.",
                "c": "`perfcourse grade` reads the file on disk in a fresh kernel: edits you have "
                "not saved are not seen, so save first.",
            },
        ),
        explanation="`perfcourse grade` runs the saved file top to bottom in a fresh kernel, so "
        "unsaved edits are not seen, and prints one row per question plus `score: k/N`.",
    ),
    Question(
        id="00.q3",
        title="Mean latency in milliseconds",
        checker=_MeanLatencyCheck(),
        answer="def mean_latency_ms(samples_s):\n"
        "    return sum(samples_s) / len(samples_s) * 1000",
        explanation="The mean of the samples in seconds, times 1000. Chapter 01 shows why a "
        "mean alone hides the slow requests and percentiles do not.",
        hints=("Durations are in seconds; 1 s is 1000 ms.",),
    ),
]
