"""What a grader test suite needs: run a check the way a learner does and see what they see.

``passes(qid, answer)`` fails the test unless the check prints the right mark; ``fails(qid,
answer, *parts)`` fails the test unless the check refuses the answer with a hint (an
``AssertionError``, never a grader error) that contains every one of ``parts`` (case ignored).
"""

from __future__ import annotations

import contextlib
import io

import pytest

from perfcourse.grading import check
from perfcourse.grading.bank import RIGHT_MARK, GraderError, questions
from perfcourse.grading.checkers import Choice, MultiChoice, Number, Value

__all__ = ["fails", "passes", "practical_questions"]


def practical_questions():
    """The questions whose answer is code (a function, a class, an index), in id order."""
    return [
        q for q in questions()
        if not isinstance(q.checker, (Choice, MultiChoice, Number, Value))
        and ("def " in q.model_answer() or "INDEX" in q.model_answer().upper())
    ]


def passes(qid: str, answer) -> str:
    """Check ``answer``; the test fails unless it is accepted. Returns what the check printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            check(qid, answer)
        except AssertionError as exc:
            pytest.fail(f"{qid}: a right answer was refused: {exc}")
        except GraderError as exc:
            pytest.fail(f"{qid}: a right answer gave a grader error: {exc}")
    assert printed.getvalue().startswith(RIGHT_MARK), printed.getvalue()
    return printed.getvalue()


def fails(qid: str, answer, *parts: str) -> str:
    """Check ``answer``; the test fails unless it is refused with a hint containing ``parts``."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            check(qid, answer)
    except AssertionError as exc:
        hint = str(exc)
    except GraderError as exc:
        pytest.fail(f"{qid}: the answer gave a grader error instead of a hint: {exc}")
    else:
        pytest.fail(f"{qid}: a wrong answer was accepted: {printed.getvalue()[:300]}")
    assert hint.strip(), f"{qid}: refused without a hint"
    for part in parts:
        assert part.lower() in hint.lower(), f"{qid}: hint {hint!r} does not mention {part!r}"
    return hint
