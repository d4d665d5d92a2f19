"""The question bank: the :class:`Question` type, the registry, and ``check``/``reveal``.

Questions live in ``perfcourse.grading.questions``, one module per chapter (``ch00.py``,
``ch01.py``, ...), each with a module-level list ``QUESTIONS``. Every module of that package is
loaded the first time a question is looked up; ids must be unique and have the form ``NN.qK``
with ``NN`` the chapter of the module they are in. Tests (and a maintainer trying a question out
in a notebook) can add one at run time with :func:`register`.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import threading
from dataclasses import dataclass, field

from ..errors import CHECK_ATTRIBUTE, CourseError
from .checkers import (
    NO_ANSWER,
    Checker,
    Incorrect,
    LearnerTimeout,
    NoAnswer,
    describe_exit,
    time_limit,
)

__all__ = [
    "GRADED_CALL",
    "MAX_TIME_LIMIT",
    "QUESTION_ID",
    "RIGHT_MARK",
    "check",
    "graded_ids",
    "GraderError",
    "load_bank",
    "Question",
    "question",
    "questions",
    "register",
    "reveal",
    "UnknownQuestion",
    "unregister",
]

QUESTION_ID = re.compile(r"^(?P<chapter>\d{2})\.q(?P<number>\d+)$")
#: Printed first when an answer is right; the grade runner looks for it.
RIGHT_MARK = "✓"
#: Seconds of learner code any one check allows at most, whatever its question says: a runaway
#: answer gets its hint within this time.
MAX_TIME_LIMIT = 15.0


class UnknownQuestion(CourseError, LookupError):
    """``check``/``reveal`` was called with an id the bank does not have."""


class GraderError(CourseError):
    """The grader itself failed (a bug of the course, not of the learner's answer)."""


@dataclass(frozen=True)
class Question:
    """One graded question.

    ``id`` is ``NN.qK``; ``title`` a few words (shown in the score table); ``checker`` one of the
    kinds of :mod:`perfcourse.grading.checkers`; ``answer`` the model answer (text or code,
    defaults to what the checker knows, e.g. the right option); ``explanation`` why it is right;
    ``hints`` extra hints, one more per wrong attempt; ``time_limit`` seconds the learner's code
    may run in one check (at most :data:`MAX_TIME_LIMIT`, which ``check`` enforces).
    """

    id: str
    title: str
    checker: Checker
    answer: str = ""
    explanation: str = ""
    hints: tuple[str, ...] = ()
    time_limit: float = 10.0

    def __post_init__(self):
        if not QUESTION_ID.match(self.id):
            raise ValueError(f"Question id {self.id!r} must look like '02.q3'")
        if not isinstance(self.checker, Checker):
            raise TypeError(f"Question {self.id}: checker must be a Checker, got {self.checker!r}")
        if isinstance(self.hints, str):
            object.__setattr__(self, "hints", (self.hints,))


    @property
    def chapter(self) -> str:
        return self.id.split(".")[0]

    def model_answer(self) -> str:
        return (self.answer or self.checker.model_answer()).strip()


@dataclass
class _Registry:
    questions: dict[str, Question] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    loaded: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


_REGISTRY = _Registry()
_attempts: dict[str, int] = {}


def _add(q: Question, origin: str, replace: bool = False) -> None:
    if q.id in _REGISTRY.questions and not replace:
        raise ValueError(
            f"Question {q.id} is defined twice: in {_REGISTRY.origin[q.id]} and in {origin}"
        )
    _REGISTRY.questions[q.id] = q
    _REGISTRY.origin[q.id] = origin
    _attempts.pop(q.id, None)


def load_bank() -> dict[str, Question]:
    """Import every module of ``perfcourse.grading.questions`` once; return the registry."""
    with _REGISTRY.lock:
        if _REGISTRY.loaded:
            return _REGISTRY.questions
        package = importlib.import_module(f"{__package__}.questions")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            chapter = re.fullmatch(r"ch(\d{2})(?:_lab)?", info.name)
            for q in getattr(module, "QUESTIONS", ()):
                if chapter and q.chapter != chapter.group(1):
                    raise ValueError(f"Question {q.id} is in {module.__name__}, not ch{q.chapter}")
                _add(q, module.__name__)
        _REGISTRY.loaded = True
        return _REGISTRY.questions


def register(q: Question, *, replace: bool = False) -> Question:
    """Add a question at run time (tests, trying a question out). Returns it."""
    load_bank()
    with _REGISTRY.lock:
        _add(q, "register()", replace=replace)
    return q


def unregister(qid: str) -> None:
    """Remove a question added with :func:`register` (tests clean up with it)."""
    with _REGISTRY.lock:
        if _REGISTRY.origin.get(qid) == "register()":
            del _REGISTRY.questions[qid]
            del _REGISTRY.origin[qid]
            _attempts.pop(qid, None)


def questions(chapter: str | None = None) -> list[Question]:
    """All questions, in id order, or those of one chapter (``"02"``)."""
    bank = load_bank()
    found = [q for q in bank.values() if chapter is None or q.chapter == chapter]
    return sorted(found, key=lambda q: (q.chapter, int(q.id.split(".q")[1])))


def question(qid: str) -> Question:
    """The question with id ``qid``; :class:`UnknownQuestion` (with the known ids) if none."""
    bank = load_bank()
    if isinstance(qid, str) and qid in bank:
        return bank[qid]
    if not isinstance(qid, str) or not QUESTION_ID.match(qid):
        raise UnknownQuestion(
            f"{qid!r} is not a question id: ids look like \"02.q3\" (chapter, then question)."
        )
    same_chapter = [q.id for q in questions(qid.split(".")[0])]
    known = f" Chapter {qid[:2]} has {', '.join(same_chapter)}." if same_chapter else ""
    raise UnknownQuestion(
        f"No question {qid} in this version of perfcourse.{known} Check the id, or update the "
        "course package (git pull, then pip install -e .)."
    )


def _say_right(q: Question) -> None:
    lines = [f"{RIGHT_MARK} {q.id} right: {q.title}."]
    model = q.model_answer()
    if model:
        lines.append(("Model answer:\n" if "\n" in model else "Model answer: ") + model)
    if q.explanation:
        lines.append("Why: " + q.explanation.strip())
    print("\n".join(lines))


def check(qid: str, answer) -> None:
    """Grade ``answer`` to question ``qid``.

    Right: prints a short confirmation with the model answer and why it is right. Wrong, missing
    (``...``, ``None``, a stub that raises ``NotImplementedError``) or ill-typed: raises
    ``AssertionError`` whose message is a hint. Learner code that raises or runs past the time
    limit is reported in that message. A failure of the grader itself raises
    :class:`GraderError` ("grader error in NN.qK, please report: ...").
    """
    __tracebackhide__ = True  # IPython and pytest hide this frame
    q = question(qid)
    hint = internal = None
    limit = min(q.time_limit, MAX_TIME_LIMIT)
    try:
        if answer is Ellipsis or (answer is None and not q.checker.accepts_none):
            raise NoAnswer(NO_ANSWER)
        with time_limit(limit):
            q.checker.grade(answer)
    except NoAnswer as exc:
        hint = str(exc)
    except Incorrect as exc:
        attempt = _attempts.get(qid, 0)
        _attempts[qid] = attempt + 1
        hint = "Not yet. " + str(exc)
        if q.hints:
            hint += " Hint: " + q.hints[min(attempt, len(q.hints) - 1)]
    except LearnerTimeout:  # an alarm that fired just after learner code returned
        hint = f"Not yet. Your code was stopped after its time limit of {limit:g} s."
    except SystemExit as exc:  # learner code the checker ran without call_learner
        hint = "Not yet. " + describe_exit(exc)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - never show the learner the grader's traceback
        internal = f"grader error in {qid}, please report: {type(exc).__name__}: {exc}"
    if internal is not None:
        raise GraderError(internal) from None
    if hint is not None:
        error = AssertionError(hint)
        setattr(error, CHECK_ATTRIBUTE, qid)  # shown as a hint, not a traceback (errors.py)
        raise error from None
    _say_right(q)


def reveal(qid: str) -> None:
    """Print the model answer and explanation of ``qid`` (for when you are stuck)."""
    q = question(qid)
    lines = [f"{q.id} {q.title}", "Model answer:" + ("\n" if "\n" in q.model_answer() else " ")
             + q.model_answer()]
    if q.explanation:
        lines.append("Why: " + q.explanation.strip())
    print("\n".join(lines))


def graded_ids(source: str) -> list[str]:
    """The question ids a cell checks, in order (``check("02.q3", ...)`` calls)."""
    return list(dict.fromkeys(GRADED_CALL.findall(source)))


#: A graded cell calls ``check("NN.qK", ...)``.
GRADED_CALL = re.compile(r"""\bcheck\(\s*["'](\d{2}\.q\d+)["']""")
