"""Checker kinds: the reusable building blocks a question is graded with.

A checker has one method, ``grade(answer)``. It returns quietly when the answer is right and
raises :class:`Incorrect` with a hint (one or two sentences, addressed to the learner) when it is
wrong or ill-typed. It never raises ``AssertionError`` itself: :func:`perfcourse.grading.check`
turns ``Incorrect`` into the ``AssertionError`` the learner sees and everything else into a
"grader error".

Learner code (a function the learner wrote) is always called through :func:`call_learner`, which
turns its exceptions into ``Incorrect("your code raised X: message")`` and stops it after the
question's time limit. Never grade by wall time: the limit only stops runaway code.

Kinds:

* :class:`Choice` - one option out of several, with an explanation per wrong option.
* :class:`MultiChoice` - a set of options.
* :class:`Number` - a number, with a tolerance.
* :class:`Value` - a short exact value (a string, a tuple, ...).
* :class:`FunctionCheck` - a function the learner writes, run on hidden inputs against a reference.
* :class:`QueryCheck` - an ORM loader the learner writes, graded by result and query count.
* :class:`ExplainCheck` - a schema change (index) the learner writes, graded by the query plan.

How the time limit works: on Linux and macOS, in the main thread (where IPython kernels run
cells), ``SIGALRM`` interrupts the learner's code with :class:`LearnerTimeout` at the next Python
bytecode. Learner code that swallows it (a bare ``except:`` in a loop) is interrupted again every
:data:`REPEAT_S` seconds, and from then on at every line it runs (a line tracer that raises), so
each swallowing ``try`` is left at its ``except`` line: no ``try`` nesting keeps the check.

Elsewhere (Windows, or a call from another thread) the code runs in a daemon thread that is
waited for; when the limit passes, the thread is sent an asynchronous ``LearnerTimeout`` (again
every :data:`REPEAT_S` seconds for a while, for code that swallows it).
Code stuck inside one long C call cannot be interrupted that way: the thread then keeps running in
the background until the call returns (it holds no lock of the grader and dies with the kernel),
while the check already reports the timeout.
"""

from __future__ import annotations

import ast
import copy
import ctypes
import inspect
import math
import numbers
import random
import re
import signal
import sys
import textwrap
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from perfcourse.explain import explain as explain_statement
from perfcourse.models import Base
from perfcourse.statements import count_queries

__all__ = [
    "NO_ANSWER",
    "NOT_WRITTEN",
    "Args",
    "apply_schema_changes",
    "explain_or_hint",
    "made_in_this_kernel",
    "call_learner",
    "Checker",
    "Choice",
    "describe_exception",
    "describe_exit",
    "ExplainCheck",
    "FunctionCheck",
    "Incorrect",
    "is_unwritten",
    "LearnerTimeout",
    "MultiChoice",
    "need_function",
    "NoAnswer",
    "Number",
    "only_create_index",
    "QueryCheck",
    "REPEAT_S",
    "short_repr",
    "shorten",
    "time_limit",
    "type_name",
    "Value",
    "values_equal",
]

#: Shown when the answer is still the stub of the learner version.
NO_ANSWER = "No answer yet: replace the `...` with your answer, then run this cell again."
NOT_WRITTEN = (
    "Not written yet: replace `raise NotImplementedError(...)` with your code, "
    "run the cell that defines it, then this one."
)


class Incorrect(Exception):
    """The answer is wrong, ill-typed or missing; the message is the hint shown to the learner."""


class NoAnswer(Incorrect):
    """The answer is still the stub of the learner version."""


class LearnerTimeout(BaseException):
    """Raised into learner code that ran past its time limit.

    A ``BaseException`` so that a learner's ``except Exception`` does not swallow it.
    """


# --------------------------------------------------------------------------------------------
# Running learner code


class _Budget:
    """Seconds of learner code one ``check`` call may still spend (shared by all its calls)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.limit = seconds

    def remaining(self) -> float | None:
        return None if self.seconds is None else max(self.seconds, 0.0)


_budget = threading.local()


@contextmanager
def time_limit(seconds: float | None):
    """Give the learner calls made inside this block ``seconds`` in total (None: no limit)."""
    previous = getattr(_budget, "current", None)
    _budget.current = _Budget(seconds)
    try:
        yield _budget.current
    finally:
        _budget.current = previous


def _describe_limit() -> str:
    budget = getattr(_budget, "current", None)
    limit = budget.limit if budget is not None else None
    return f"{limit:g} s" if limit is not None else "its time limit"


def call_learner(fn: Callable, *args, **kwargs):
    """Call learner code ``fn(*args, **kwargs)`` the safe way.

    Returns its result. Its exceptions become :class:`Incorrect` ("your code raised X: ..."),
    ``NotImplementedError`` from an untouched stub becomes :class:`NoAnswer`, and code that runs
    past the time limit of the current :func:`time_limit` block is stopped and reported.
    ``KeyboardInterrupt`` (the learner pressed stop) goes through.
    """
    budget = getattr(_budget, "current", None)
    seconds = budget.remaining() if budget is not None else None
    started = time.monotonic()
    try:
        if seconds is not None and seconds <= 0:
            raise LearnerTimeout
        return _run_limited(fn, args, kwargs, seconds)
    except LearnerTimeout:
        raise Incorrect(
            f"Your code was stopped after {_describe_limit()}: look for a loop that never ends "
            "or work that grows much faster than the input."
        ) from None
    except NotImplementedError:
        raise NoAnswer(NOT_WRITTEN) from None
    except Incorrect:
        raise
    except SystemExit as exc:  # sys.exit() or exit() in learner code: a hint, not a dead check
        raise Incorrect(describe_exit(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any learner error is reported, not raised
        raise Incorrect(f"Your code raised {describe_exception(exc)}") from None
    finally:
        if budget is not None and budget.seconds is not None:
            budget.seconds -= time.monotonic() - started


def describe_exit(exc: SystemExit) -> str:
    """The hint for learner code that called ``sys.exit()``."""
    code = "" if exc.code is None else short_repr(exc.code, 30)
    return (f"Your code called sys.exit({code}), which would stop the whole program: return a "
            "value (or raise an exception) instead.")


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {shorten(first, 200)}" if first else type(exc).__name__


def _run_limited(fn, args, kwargs, seconds):
    if seconds is None:
        return fn(*args, **kwargs)
    if (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0  # never clobber someone else's alarm
    ):
        return _run_with_alarm(fn, args, kwargs, seconds)
    return _run_in_thread(fn, args, kwargs, seconds)


#: After the time limit, the alarm fires again this often until the learner's code gives up.
REPEAT_S = 0.05


def _raise_timeout_on_every_line(frame, event, arg):
    if event == "line":
        raise LearnerTimeout
    return _raise_timeout_on_every_line


def _run_with_alarm(fn, args, kwargs, seconds):
    state = {"armed": True, "fired": 0}
    tracer = sys.gettrace()  # a debugger's or coverage's, given back afterwards

    def _on_alarm(signum, frame):
        if not state["armed"]:
            return
        state["fired"] += 1
        if state["fired"] > 1:
            # The first LearnerTimeout was swallowed: raise at the next line of every frame
            # of the learner's code as well (a trace function that raises is removed by Python
            # after it raised, so the next alarm puts it back).
            sys.settrace(_raise_timeout_on_every_line)
            while frame is not None and frame.f_code is not _run_with_alarm.__code__:
                frame.f_trace = _raise_timeout_on_every_line
                frame.f_trace_lines = True
                frame = frame.f_back
        raise LearnerTimeout

    try:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
    except ValueError:  # not the main thread of the main interpreter after all
        return _run_in_thread(fn, args, kwargs, seconds)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001), REPEAT_S)
    try:
        result = fn(*args, **kwargs)
        state["armed"] = False
        return result
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if state["fired"] > 1:
            sys.settrace(tracer)


def _run_in_thread(fn, args, kwargs, seconds):
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="perfcourse-learner-code", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        # Best effort: stops pure-Python loops at their next bytecode; see the module docstring.
        # Sent again every REPEAT_S for a while, for code that swallows it; the check does not
        # wait for any of that.
        def stop_worker():
            for _ in range(200):
                if not worker.is_alive():
                    return
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(worker.ident), ctypes.py_object(LearnerTimeout)
                )
                time.sleep(REPEAT_S)

        threading.Thread(target=stop_worker, name="perfcourse-learner-stop", daemon=True).start()
        raise LearnerTimeout
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# --------------------------------------------------------------------------------------------
# Helpers shared by the kinds


def shorten(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = 120) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a learner object with a broken __repr__
        text = f"<{type(value).__name__} object>"
    return shorten(text, limit)


def need_function(answer: Any, example: str) -> None:
    """Raise :class:`Incorrect` unless ``answer`` is callable, showing how to pass a function."""
    if not callable(answer):
        raise Incorrect(f"Pass your function itself, e.g. {example} (got a {type_name(answer)}).")


def is_unwritten(fn: Callable) -> bool:
    """Whether ``fn`` is still the learner version's stub: its body raises ``NotImplementedError``.

    Read from the parsed code, not the text, so a written function whose comment or string
    mentions ``NotImplementedError`` is not mistaken for a stub. False when the source is not
    available (a lambda typed at a prompt, a built-in).
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
            if len(body) == 1 and isinstance(body[0], ast.Raise) and body[0].exc is not None:
                raised = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
                return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"
            return False
    return False


_CREATE_INDEX = re.compile(r"^\s*create\s+(unique\s+)?index\b", re.IGNORECASE)


def only_create_index(ddl: str) -> list[str]:
    """The statements of ``ddl`` (split on ``;``), or :class:`Incorrect` if one is not CREATE INDEX."""
    parts = [p.strip() for p in ddl.split(";") if p.strip()]
    for part in parts:
        if not _CREATE_INDEX.match(part):
            raise Incorrect(
                f"This exercise accepts CREATE INDEX statements only, not {shorten(part, 60)!r}: "
                "change the schema by adding an index, nothing else."
            )
    return parts


def made_in_this_kernel(found: Any, what: str, how: str) -> Any:
    """``found``, the lab object a lab's cells made last in this kernel (a chapter's
    ``current_lab()``), or a hint to make it first: "No {what} in this kernel: {how}"."""
    if found is None:
        raise Incorrect(f"No {what} in this kernel: {how}")
    return found


def type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def values_equal(got: Any, expected: Any, rel_tol: float = 1e-9, abs_tol: float = 1e-12) -> bool:
    """Equality for grading: floats with a tolerance, containers element by element.

    Lists and tuples compare with each other (a learner returning a tuple where a list was expected
    is not wrong), numpy arrays and scalars are accepted for numbers.
    """
    if _is_number(expected) and _is_number(got):
        if isinstance(expected, numbers.Integral) and isinstance(got, numbers.Integral):
            return int(got) == int(expected)
        g, e = float(got), float(expected)
        if math.isnan(e):
            return math.isnan(g)
        return math.isclose(g, e, rel_tol=rel_tol, abs_tol=abs_tol)
    if hasattr(got, "__array__") and not isinstance(got, (str, bytes)):
        got = got.tolist() if hasattr(got, "tolist") else list(got)
    if hasattr(expected, "__array__") and not isinstance(expected, (str, bytes)):
        expected = expected.tolist() if hasattr(expected, "tolist") else list(expected)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(
            values_equal(g, e, rel_tol, abs_tol) for g, e in zip(got, expected)
        )
    if isinstance(expected, Mapping) and isinstance(got, Mapping):
        return set(got) == set(expected) and all(
            values_equal(got[k], expected[k], rel_tol, abs_tol) for k in expected
        )
    try:
        return bool(got == expected)
    except Exception:  # noqa: BLE001 - an ambiguous comparison is simply not equal
        return False


class Checker:
    """Base of the checker kinds. Subclasses implement :meth:`grade` and :meth:`model_answer`."""

    #: Whether ``None`` is a possible answer (otherwise ``None`` counts as "no answer yet").
    accepts_none: bool = False

    def grade(self, answer: Any) -> None:
        raise NotImplementedError

    def model_answer(self) -> str:
        """The model answer as text, used when the question does not give one."""
        return ""


# --------------------------------------------------------------------------------------------
# 1. Choices and short values


def _letters(options: Mapping[str, str]) -> str:
    keys = list(options)
    return ", ".join(f'"{k}"' for k in keys[:-1]) + f' or "{keys[-1]}"' if len(keys) > 1 else keys[0]


def _choice_key(answer: Any, options: Mapping[str, str], example: str) -> str:
    if not isinstance(answer, str):
        raise Incorrect(
            f"Answer with the letter of an option as a string, e.g. answer = \"{example}\" "
            f"(got a {type_name(answer)})."
        )
    key = answer.strip().strip("()").strip().lower()
    if key not in options:
        raise Incorrect(f"{short_repr(answer, 40)} is not an option here: use {_letters(options)}.")
    return key


@dataclass
class Choice(Checker):
    """One right option out of several: ``answer = "b"`` (case and parentheses ignored).

    ``explanations`` says, per wrong option, why it is wrong: it is the hint a learner who picked
    it gets.
    """

    options: Mapping[str, str]
    correct: str
    explanations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.options = {k.lower(): v for k, v in self.options.items()}
        self.correct = self.correct.lower()
        self.explanations = {k.lower(): v for k, v in self.explanations.items()}
        if self.correct not in self.options:
            raise ValueError(f"Choice: correct option {self.correct!r} is not among the options")
        unknown = set(self.explanations) - set(self.options)
        if unknown:
            raise ValueError(f"Choice: explanations for unknown options {sorted(unknown)}")

    def grade(self, answer):
        key = _choice_key(answer, self.options, next(iter(self.options)))
        if key != self.correct:
            raise Incorrect(
                self.explanations.get(key)
                or f"({key}) is not the best answer: reread the options and try again."
            )

    def model_answer(self):
        return f"({self.correct}) {self.options[self.correct]}"


@dataclass
class MultiChoice(Checker):
    """Every right option and no other: ``answer = {"a", "c"}`` (a set, list, or ``"a, c"``)."""

    options: Mapping[str, str]
    correct: Iterable[str]
    explanations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.options = {k.lower(): v for k, v in self.options.items()}
        self.correct = frozenset(k.lower() for k in self.correct)
        self.explanations = {k.lower(): v for k, v in self.explanations.items()}
        if not self.correct <= set(self.options):
            raise ValueError("MultiChoice: every correct option must be among the options")

    def grade(self, answer):
        example = ", ".join(sorted(self.options)[:2])
        if isinstance(answer, str):
            parts = [p for p in re.split(r"[\s,;]+", answer) if p]
            if len(parts) == 1 and len(parts[0]) > 1 and all(c in self.options for c in parts[0].lower()):
                parts = list(parts[0])
            answer = parts
        if not isinstance(answer, (set, frozenset, list, tuple)):
            raise Incorrect(
                f'Answer with a set of option letters, e.g. answer = {{"{example.split(", ")[0]}"}} '
                f"(got a {type_name(answer)})."
            )
        picked = {_choice_key(a, self.options, example[0]) for a in answer}
        wrong = sorted(picked - self.correct)
        if wrong:
            key = wrong[0]
            raise Incorrect(
                self.explanations.get(key) or f"({key}) does not belong in the answer."
            )
        missing = self.correct - picked
        if missing:
            many = "options are" if len(missing) > 1 else "option is"
            raise Incorrect(f"Everything you picked is right, but {len(missing)} more {many} too.")

    def model_answer(self):
        return "; ".join(f"({k}) {self.options[k]}" for k in sorted(self.correct))


@dataclass
class Number(Checker):
    """A number within a tolerance of ``value`` (relative ``rel_tol``, absolute ``abs_tol``).

    ``direction`` adds "too high"/"too low" to the hint; ``unit`` is named in hints.
    """

    value: float
    rel_tol: float = 0.01
    abs_tol: float = 0.0
    unit: str = ""
    direction: bool = True

    def grade(self, answer):
        unit = f" (in {self.unit})" if self.unit else ""
        if not _is_number(answer):
            raise Incorrect(
                f"Answer with a number{unit}, e.g. answer = 42, not a {type_name(answer)}."
            )
        got = float(answer)
        if math.isnan(got):
            raise Incorrect("Your answer is NaN: check the calculation that produced it.")
        if not math.isclose(got, self.value, rel_tol=self.rel_tol, abs_tol=self.abs_tol):
            side = ""
            if self.direction:
                side = " It is too high." if got > self.value else " It is too low."
            raise Incorrect(f"{got:g}{unit} is not right.{side}")

    def model_answer(self):
        return f"{self.value:g}{' ' + self.unit if self.unit else ''}"


def _normalize_text(value):
    return " ".join(value.split()).casefold() if isinstance(value, str) else value


@dataclass
class Value(Checker):
    """A short exact value: ``Value("selectinload")``, ``Value((2, 3))``.

    ``normalize`` is applied to both sides first (default: strings are compared with case and
    extra spaces ignored). ``also`` lists other accepted values.
    """

    expected: Any
    normalize: Callable[[Any], Any] | None = _normalize_text
    also: tuple = ()
    accepts_none: bool = False

    def grade(self, answer):
        accepted = (self.expected, *self.also)
        if not any(isinstance(answer, type(a)) or (_is_number(a) and _is_number(answer)) for a in accepted):
            raise Incorrect(
                f"Answer with a {type_name(self.expected)}, not a {type_name(answer)}."
            )
        norm = self.normalize or (lambda v: v)
        if not any(values_equal(norm(answer), norm(a)) for a in accepted):
            raise Incorrect(f"{short_repr(answer, 60)} is not right: try again.")

    def model_answer(self):
        return repr(self.expected)


# --------------------------------------------------------------------------------------------
# 2. A function the learner writes


class Args:
    """One hidden input of a :class:`FunctionCheck`, when it needs keyword arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __repr__(self):
        parts = [short_repr(a, 60) for a in self.args]
        parts += [f"{k}={short_repr(v, 40)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def _as_args(case) -> Args:
    if isinstance(case, Args):
        return case
    if isinstance(case, tuple):
        return Args(*case)
    return Args(case)


@dataclass
class FunctionCheck(Checker):
    """A function the learner writes, compared with ``reference`` on hidden inputs.

    ``cases(rng)`` returns the inputs, generated from ``random.Random(seed)`` (the seed defaults to
    a hash of the reference's name): each case is a tuple of positional arguments, a single
    argument, or an :class:`Args`. Put edge cases (empty input, one element, ties) first. Inputs
    are deep-copied for each call, so a learner function that mutates its input does not change
    the reference's. ``compare(got, expected)`` defaults to :func:`values_equal`. With
    ``show_expected`` the hint shows the expected result for the failing input.
    """

    reference: Callable
    cases: Callable[[Any], Iterable]
    compare: Callable[[Any, Any], bool] | None = None
    seed: int | None = None
    show_expected: bool = True

    def grade(self, answer):
        if not callable(answer):
            raise Incorrect(
                "Pass the function itself, e.g. check(\"..\", my_function), "
                f"not its result (got a {type_name(answer)})."
            )
        seed = self.seed
        if seed is None:
            name = f"{self.reference.__module__}.{self.reference.__qualname__}"
            seed = zlib.crc32(name.encode())
        compare = self.compare or values_equal
        for case in self.cases(random.Random(seed)):
            case = _as_args(case)
            expected = self.reference(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
            try:
                got = call_learner(answer, *copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
            except NoAnswer:
                raise
            except Incorrect as exc:
                raise Incorrect(f"{exc} (input: {case!r})") from None
            if got is None and expected is not None:
                raise Incorrect(
                    f"Your function returned None for the input {case!r}: did you forget `return`?"
                )
            if not compare(got, expected):
                shown = f", expected {short_repr(expected, 80)}" if self.show_expected else ""
                raise Incorrect(
                    f"For the input {case!r} your function returned {short_repr(got, 80)}{shown}."
                )

    def model_answer(self):
        try:
            return inspect.getsource(self.reference)
        except (OSError, TypeError):
            return ""


# --------------------------------------------------------------------------------------------
# 3. An ORM loader the learner writes, graded by result and query count


def _resolve_engine(engine):
    return engine if isinstance(engine, Engine) else engine()


def _repeated_statement_hint(statements) -> str:
    if not statements:
        return ""
    normal = Counter(" ".join(str(getattr(s, "sql", s)).split()) for s in statements)
    text, times = normal.most_common(1)[0]
    if times > 2:
        return f" The same query ran {times} times ({shorten(text, 70)}): that is the N+1 pattern."
    return ""


@dataclass
class QueryCheck(Checker):
    """A loader the learner writes, ``answer(session, *args)``, graded by rows and query count.

    ``reference(session, *args)`` is the model loader. ``use(result)`` is what the page does with
    the result (e.g. touch each order's items): it runs while queries are counted, so lazy loads
    triggered by it count, and its return value (plain data) is what is compared. ``engine`` is an
    Engine or a callable returning one (the grader's own data, not the learner's). At most
    ``max_queries`` statements may run. ``counter`` defaults to
    :func:`perfcourse.statements.count_queries` (a context manager yielding an object with
    ``.count`` and ``.statements``).
    """

    reference: Callable
    engine: Any
    max_queries: int
    use: Callable[[Any], Any] = lambda result: result
    args: tuple = ()
    compare: Callable[[Any, Any], bool] | None = None
    counter: Callable | None = None
    hint: str = ""

    def grade(self, answer):
        if not callable(answer):
            raise Incorrect(
                "Pass your loader function itself, e.g. check(\"..\", load_orders) "
                f"(got a {type_name(answer)})."
            )
        engine = _resolve_engine(self.engine)
        counter = self.counter or count_queries
        with Session(engine) as session:
            expected = self.use(self.reference(session, *self.args))
        with Session(engine) as session:
            with counter(engine) as counted:
                got = call_learner(lambda: self.use(answer(session, *self.args)))
            count, statements = counted.count, list(getattr(counted, "statements", []))
        if not (self.compare or values_equal)(got, expected):
            raise Incorrect(
                "Your loader returns other rows than expected: check the filter, the order "
                f"and what you return (first difference hidden; got {short_repr(got, 60)})."
            )
        if count > self.max_queries:
            limit = f"at most {self.max_queries} {'is' if self.max_queries == 1 else 'are'} needed"
            raise Incorrect(
                f"Right rows, but your code ran {count} queries and {limit}."
                + _repeated_statement_hint(statements)
                + (f" {self.hint}" if self.hint else "")
            )


# --------------------------------------------------------------------------------------------
# 4. A schema change graded by the query plan


@contextmanager
def models_left_as_declared():
    """Undo, when the block ends, every index the block attached to the course's models.

    ``sa.Index("ix", Order.__table__.c.user_id)`` attaches itself to the ``orders`` table of the
    models for good: every schema created from them afterwards (a scratch copy, a seeded
    dataset, the next check) would hold the learner's index. A check runs learner code inside
    this block, so what a right answer built never makes a later wrong answer pass.
    """
    before = {table: set(table.indexes) for table in Base.metadata.tables.values()}
    try:
        yield
    finally:
        for table, indexes in before.items():
            for index in set(table.indexes) - indexes:
                table.indexes.discard(index)


def apply_schema_changes(engine: Engine, answer) -> None:
    """Apply a learner's schema change to ``engine``: a ``CREATE INDEX`` string, a SQLAlchemy
    ``Index``, a function ``answer(engine)``, or a list of those. Anything else, and DDL that is
    not ``CREATE INDEX``, is a hint. Indexes the learner's code attaches to the course's models
    are detached afterwards (:func:`models_left_as_declared`)."""
    with models_left_as_declared():
        for change in answer if isinstance(answer, (list, tuple)) else [answer]:
            if isinstance(change, str):
                parts = only_create_index(change)

                def run_ddl(parts=parts):
                    with engine.begin() as conn:
                        for part in parts:
                            conn.exec_driver_sql(part)

                call_learner(run_ddl)
            elif isinstance(change, sa.Index):
                # An Index built on the course's models is attached to their metadata, so a fresh
                # schema made from that metadata may already have it.
                call_learner(lambda change=change: change.create(engine, checkfirst=True))
            elif callable(change):
                call_learner(change, engine)
            else:
                raise Incorrect(
                    "Answer with a CREATE INDEX statement (a string), a SQLAlchemy Index, or a "
                    f"function that takes the engine (got a {type_name(change)})."
                )


def explain_or_hint(engine: Engine, statement, params: dict | None = None, *, explain: Callable | None = None):
    """The plan of ``statement`` (:func:`perfcourse.explain.explain`, or ``explain``); a schema
    the learner's change broke is a hint, not a grader error."""
    explain = explain or explain_statement
    try:
        return explain(engine, statement, params) if params else explain(engine, statement)
    except sa.exc.DBAPIError as exc:  # the learner's change broke the schema the query needs
        raise Incorrect(
            f"After your change the query no longer runs ({shorten(str(exc.orig), 100)}): add an "
            "index, do not drop or alter tables."
        ) from None


@dataclass
class ExplainCheck(Checker):
    """A schema change the learner writes, graded by the plan of ``statement``.

    The answer may be a DDL string (``"CREATE INDEX ..."``), a SQLAlchemy ``Index``, a function
    ``answer(engine)`` that makes the change, or a list of those. ``engine`` must be a callable
    returning a *fresh* engine without the index (each check applies the change again).
    ``statement`` is SQL text, a SQLAlchemy statement, or a callable ``statement(engine)``. The
    plan (:func:`perfcourse.explain.explain`, with ``.uses_index``, ``.index`` and ``.verdict``)
    must use an index; ``index`` (a name or a tuple of names) and ``verdicts`` narrow that down.
    ``params`` are bound to ``:name`` parameters of a SQL text statement.
    """

    statement: Any
    engine: Callable
    index: str | tuple[str, ...] | None = None
    verdicts: tuple[str, ...] = ()
    params: dict | None = None
    explain: Callable | None = None
    hint: str = ""

    def grade(self, answer):
        engine = self.engine()
        try:
            apply_schema_changes(engine, answer)
            statement = self.statement(engine) if callable(self.statement) else self.statement
            plan = explain_or_hint(engine, statement, self.params, explain=self.explain)
        finally:
            engine.dispose()
        extra = f" {self.hint}" if self.hint else ""
        if not plan.uses_index:
            raise Incorrect(f"The query still runs as a {plan.verdict}: no index serves it.{extra}")
        if plan.scanned_tables:
            # In a join one table can use an index while another is still read row by row.
            raise Incorrect(
                f"The plan still reads {', '.join(plan.scanned_tables)} in full: index that "
                f"access too.{extra}"
            )
        wanted = (self.index,) if isinstance(self.index, str) else self.index
        if wanted and not set(wanted) & set(plan.indexes):
            raise Incorrect(
                f"The query uses the index {plan.index}, not the one this exercise asks for.{extra}"
            )
        if self.verdicts and plan.verdict not in self.verdicts:
            raise Incorrect(
                f"The plan is a {plan.verdict}; this exercise wants a {' or '.join(self.verdicts)}."
                + extra
            )
