"""The package's layout holds: every module declares its public names, re-exports nothing of
other libraries, and graders reach chapter code through public names only. (The floors and
the chapters' independence are import-linter contracts: `make lint`.)"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

import perfcourse

PACKAGE = Path(perfcourse.__file__).parent
MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages([str(PACKAGE)], prefix="perfcourse.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_all_and_exports_only_its_own(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for public in module.__all__:
        assert hasattr(module, public), f"{name}.__all__ names {public!r}, which it does not define"
        value = getattr(module, public)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("perfcourse"), (
                f"{name} re-exports {value.__module__}.{public}: import it from its library instead"
            )


def _is_module(parent: str, name: str) -> bool:
    """Whether ``parent.name`` is a module of a chapter subpackage (10's capstone)."""
    package = importlib.import_module(parent)
    return hasattr(package, "__path__") and importlib.util.find_spec(f"{parent}.{name}") is not None


def _chapter_aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to chapter modules in a grading module: alias -> module."""
    aliases = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("perfcourse.chapters"):
            continue
        for alias in node.names:
            if node.module == "perfcourse.chapters" or _is_module(node.module, alias.name):
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def test_graders_use_public_chapter_names_only():
    problems = []
    for path in sorted((PACKAGE / "grading").rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = _chapter_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("perfcourse.chapters."):
                public = importlib.import_module(node.module).__all__
                problems += [f"{path.name}: from {node.module} import {a.name}"
                             for a in node.names if a.name not in public and not _is_module(node.module, a.name)]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                module = aliases.get(node.value.id)
                dunder = node.attr.startswith("__") and node.attr.endswith("__")  # a module's __name__
                if module and not dunder and node.attr not in importlib.import_module(module).__all__:
                    problems.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not problems, "graders reach chapter code by private names: " + ", ".join(problems)


def test_the_package_docstring_draws_the_floors():
    doc = perfcourse.__doc__
    for floor in ("tooling", "grading", "chapters", "platform"):
        assert floor in doc
