"""Errors that teach: one sentence saying what went wrong and what to do."""

from __future__ import annotations

import textwrap

__all__ = [
    "CHECK_ATTRIBUTE",
    "BackendUnavailable",
    "CourseError",
    "install_notebook_handler",
    "InvalidChoice",
]


class CourseError(RuntimeError):
    """Base of the course's own errors. Its message is meant to be read by a learner as is."""


class InvalidChoice(CourseError, ValueError):
    """An argument outside the values the course knows (a scale, a backend)."""


class BackendUnavailable(CourseError):
    """A database or cache the course needs could not be reached or started."""


#: Set by :func:`perfcourse.grading.check` on the ``AssertionError`` of a failed check: the
#: question id. A notebook shows such an error as its hint, not as a traceback.
CHECK_ATTRIBUTE = "perfcourse_question"
_HINT_WIDTH = 100


def _hint_lines(qid: str, hint: str, colors: bool) -> list[str]:
    """A failed check as a learner reads it: a red cross, the question, the hint wrapped."""
    mark = f"\x1b[1;31m✗ {qid}\x1b[0m" if colors else f"✗ {qid}"
    lines = textwrap.wrap(hint, _HINT_WIDTH - len(qid) - 3) or [""]
    return [f"{mark} {lines[0]}"] + [" " * (len(qid) + 3) + line for line in lines[1:]]


def install_notebook_handler() -> None:
    """Inside IPython, show errors that teach without a traceback through the course's code.

    A :class:`CourseError` prints its message alone. A failed check (an ``AssertionError``
    carrying :data:`CHECK_ATTRIBUTE`) shows its hint, styled, as the cell's error: the kernel
    still reports an error, so graders and nbval see it, and a cell tagged ``raises-exception``
    lets Run All go on. Any other ``AssertionError`` keeps its usual traceback.
    Called by :func:`perfcourse.notebook.setup`; harmless outside IPython.
    """
    try:
        from IPython import get_ipython  # noqa: PLC0415 - IPython is slow to import; only notebooks need it
    except ImportError:  # pragma: no cover - IPython is always there in the course
        return
    shell = get_ipython()
    if shell is None:
        return

    def _show(shell, etype, value, tb, tb_offset=None):
        if issubclass(etype, CourseError):
            print(f"{etype.__name__}: {value}")
            return None
        qid = getattr(value, CHECK_ATTRIBUTE, None)
        if qid is None:  # the learner's own assert
            stb = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
        else:
            stb = _hint_lines(qid, str(value), colors=getattr(shell, "colors", "") != "nocolor")
        shell._showtraceback(etype, value, stb)  # the error message JupyterLab and nbval receive
        return stb

    shell.set_custom_exc((CourseError, AssertionError), _show)
