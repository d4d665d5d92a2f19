"""Learner code can never hang a check, escape it or turn it into a grader error.

Every practical question (one whose answer is code) is given code that raises, returns None,
returns the wrong type, loops forever (also behind a bare ``except``), calls ``sys.exit``, and a
value that is not code at all. Each must be refused with a hint (an ``AssertionError``). The
runaway ones run under a lowered cap, so the suite stays quick; what they prove is that the cap
stops them, not how long anything takes.
"""

from __future__ import annotations

import sys

import pytest

from perfcourse.grading import bank

from .kit import fails, practical_questions

PRACTICAL = practical_questions()


def raises(*args, **kwargs):
    raise ValueError("learner bug")


def returns_none(*args, **kwargs):
    return None


def wrong_type(*args, **kwargs):
    return object()


def exits(*args, **kwargs):
    sys.exit(1)


def loops(*args, **kwargs):
    while True:
        pass


def swallows(*args, **kwargs):
    while True:
        try:
            sum(range(100))
        except:  # noqa: E722 - a bare except, as learners write it, swallowing the time limit
            pass


HOSTILE = [raises, returns_none, wrong_type, exits, 42, "not code at all"]
RUNAWAY = [loops, swallows]


def _name(value):
    return getattr(value, "__name__", type(value).__name__)


@pytest.mark.parametrize("answer", HOSTILE, ids=_name)
@pytest.mark.parametrize("q", PRACTICAL, ids=lambda q: q.id)
def test_hostile_code_gets_a_hint(q, answer):
    fails(q.id, answer)


@pytest.mark.parametrize("answer", RUNAWAY, ids=_name)
@pytest.mark.parametrize("q", PRACTICAL, ids=lambda q: q.id)
def test_runaway_code_is_stopped_with_a_hint(q, answer, monkeypatch):
    monkeypatch.setattr(bank, "MAX_TIME_LIMIT", 1.0)
    fails(q.id, answer)


def test_every_practical_is_covered():
    assert len(PRACTICAL) >= 20, [q.id for q in PRACTICAL]
