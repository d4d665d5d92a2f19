"""Graded exercises: ``check`` an answer, ``reveal`` a model answer.

In a notebook::

    from perfcourse.grading import check, reveal

    answer = "b"
    check("00.q1", answer)      # right: a confirmation; wrong: AssertionError with a hint

Questions are keyed by id (``NN.qK``) and live in this package (``perfcourse.grading.questions``,
one module per chapter), never in notebook metadata: renaming or copying a notebook does not
break grading. ``perfcourse grade`` runs a saved notebook and prints a score table.

Adding a question (``src/perfcourse/grading/questions/ch02.py``)::

    from perfcourse.grading import Choice, Question

    QUESTIONS = [
        Question(
            id="02.q1",
            title="Eager loading for a list page",
            checker=Choice(
                options={"a": "lazy loading", "b": "selectinload", "c": "joinedload on 3 levels"},
                correct="b",
                explanations={"a": "Lazy loading issues one query per order: N+1.", ...},
            ),
            explanation="selectinload issues one extra IN query per relationship, whatever N.",
        ),
    ]
"""

from __future__ import annotations

# The question modules' package is imported before the function ``questions`` is bound here:
# importing a submodule for the first time sets the parent's attribute of that name, which
# would otherwise replace the function with the package as soon as the bank loads.
from . import questions as _question_modules  # noqa: F401
from .bank import (
    GraderError,
    Question,
    UnknownQuestion,
    check,
    graded_ids,
    load_bank,
    question,
    questions,
    register,
    reveal,
    unregister,
)
from .checkers import (
    Args,
    Checker,
    Choice,
    ExplainCheck,
    FunctionCheck,
    Incorrect,
    MultiChoice,
    Number,
    QueryCheck,
    Value,
    call_learner,
    values_equal,
)

__all__ = [
    "Args",
    "Checker",
    "Choice",
    "ExplainCheck",
    "FunctionCheck",
    "GraderError",
    "Incorrect",
    "MultiChoice",
    "Number",
    "QueryCheck",
    "Question",
    "UnknownQuestion",
    "Value",
    "call_learner",
    "check",
    "graded_ids",
    "load_bank",
    "question",
    "questions",
    "register",
    "reveal",
    "unregister",
    "values_equal",
]
