"""Errors that teach: one sentence saying what went wrong and what to do."""

from __future__ import annotations

__all__ = [
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


def install_notebook_handler() -> None:
    """Inside IPython, show :class:`CourseError` as its message alone, not a traceback.

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
        print(f"{etype.__name__}: {value}")
        return None

    shell.set_custom_exc((CourseError,), _show)
