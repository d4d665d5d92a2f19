"""No function the course ships solves a practical exercise (STYLE.md rule 6).

Reference answers live with the grader only. Every public function of a chapter module, and of
the platform modules a lesson leans on for the same jobs (statistics, statement counting,
plans), is offered as the answer to every practical question of its chapter (the platform ones
to every practical) when it takes as many arguments as the model answer; each must be refused.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

from .kit import fails, practical_questions

CHAPTER_MODULES = {
    "01": "performance_fundamentals",
    "02": "query_optimization",
    "03": "database_scaling",
    "04": "memory_and_cpu",
    "05": "caching",
    "06": "background_jobs",
    "07": "infrastructure_scaling",
    "08": "monitoring_and_profiling",
    "09": "common_performance_issues",
    "10": "interview_questions",
}
PLATFORM_MODULES = ["perfcourse.stats", "perfcourse.timing", "perfcourse.statements"]

#: Functions that act on servers or processes when called with whatever a check passes them:
#: offering them as answers could stop a database backend or a server, so they are left out.
#: They take arguments no practical asks for (a pid, a server), so none could pass anyway.
UNSAFE = {"terminate_backend", "serve", "drop_shards", "drop_profiles", "delete_namespace"}

PRACTICAL = practical_questions()


def _arity(q) -> int | None:
    """How many positional arguments the model answer takes (None: not a function)."""
    found = re.search(r"^def \w+\(([^)]*)\)", q.model_answer(), re.MULTILINE)
    if not found:
        return None
    params = [p for p in found.group(1).split(",") if p.strip() and not p.strip().startswith("*")]
    return len([p for p in params if "=" not in p])


def _callable_with(fn, arity: int | None) -> bool:
    """Whether ``fn`` could be called as the answer is (a function of ``arity`` arguments)."""
    if arity is None:
        return True
    try:
        inspect.signature(fn).bind(*range(arity))
    except TypeError:
        return False
    return True


def _public_callables(module_name: str, classes: bool):
    """The module's public functions (and classes, when the answer is a class)."""
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
        value = getattr(module, name)
        wanted = inspect.isfunction(value) or (classes and inspect.isclass(value))
        if wanted and name not in UNSAFE and getattr(value, "__module__", "") == module_name:
            yield f"{module_name.rsplit('.', 1)[-1]}.{name}", value


def _cases():
    for q in PRACTICAL:
        names = list(PLATFORM_MODULES)
        if q.chapter in CHAPTER_MODULES:
            chapter = importlib.import_module(f"perfcourse.chapters.{CHAPTER_MODULES[q.chapter]}")
            names.append(chapter.__name__)
            # A chapter that is a subpackage (10: lesson and capstone) offers every module of it.
            names += [f"{chapter.__name__}.{m.name}" for m in pkgutil.iter_modules(getattr(chapter, "__path__", []))]
        for module_name in names:
            classes = bool(re.search(r"^class ", q.model_answer(), re.MULTILINE))
            for label, fn in _public_callables(module_name, classes):
                if classes or _callable_with(fn, _arity(q)):
                    yield pytest.param(q.id, fn, id=f"{q.id}-{label}")


@pytest.mark.parametrize(("qid", "fn"), list(_cases()))
def test_no_course_function_passes_a_practical(qid, fn):
    fails(qid, fn)
