"""Chapter 00, setup and dataset: how the course runs and how grading works."""

from __future__ import annotations

from ..bank import Question
from ..checkers import Choice, FunctionCheck

__all__ = [
    "QUESTIONS",
]


def _mean_latency_ms(samples_s):
    return sum(samples_s) / len(samples_s) * 1000


def _latency_samples(rng):
    yield ([0.25],)  # one sample
    yield ([0.1, 0.2, 0.3],)
    yield ([0.001] * 7,)
    for _ in range(10):
        yield ([rng.uniform(0.0005, 2.0) for _ in range(rng.randint(2, 50))],)


QUESTIONS = [
    Question(
        id="00.q1",
        title="The default backend",
        checker=Choice(
            options={
                "a": "A SQLite file under data/",
                "b": "The embedded PostgreSQL server",
                "c": "Redis",
                "d": "An in-memory Python dict",
            },
            correct="a",
            explanations={
                "b": "PostgreSQL is used when you ask for it (or set DATABASE_URL); it is not "
                "the default because it has to start first.",
                "c": "Redis is the course's cache and queue, not where the shop tables live.",
                "d": "The shop data lives in a real database, so queries and plans are real.",
            },
        ),
        explanation="SQLite needs no server, so it always works, on a laptop and in Binder. "
        "PostgreSQL (embedded or DATABASE_URL) is one argument away when a chapter compares both.",
    ),
    Question(
        id="00.q2",
        title="How to grade a notebook",
        checker=Choice(
            options={
                "a": "Save the notebook, then run `perfcourse grade notebooks/00-setup-and-dataset.ipynb`",
                "b": "Run `pytest --nbval notebooks/00-setup-and-dataset.ipynb`",
                "c": "Run all cells: the score is in the last cell",
                "d": "Nothing: notebooks are graded when you close them",
            },
            correct="a",
            explanations={
                "b": "Strict nbval compares every output, so your own timings would fail; "
                "`perfcourse grade` runs in lax mode and prints a score table.",
                "c": "Each check cell tells you right or wrong, but the score table comes from "
                "`perfcourse grade`, which runs the whole saved notebook in a fresh kernel.",
                "d": "Grading is a command you run; nothing happens when a notebook closes.",
            },
        ),
        explanation="`perfcourse grade` runs the saved file top to bottom in a fresh kernel, so "
        "unsaved edits are not seen, and prints one row per question plus `score: k/N`.",
    ),
    Question(
        id="00.q3",
        title="Mean latency in milliseconds",
        checker=FunctionCheck(reference=_mean_latency_ms, cases=_latency_samples),
        answer="def mean_latency_ms(samples_s):\n"
        "    return sum(samples_s) / len(samples_s) * 1000",
        explanation="The mean of the samples in seconds, times 1000. Chapter 01 shows why a "
        "mean alone hides the slow requests and percentiles do not.",
        hints=("Durations are in seconds; 1 s is 1000 ms.",),
    ),
]
