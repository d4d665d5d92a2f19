"""Authoring: generate learner notebooks from the masters, refresh the masters' outputs.

``perfcourse assign [MASTERS] [--check]``
    ``solutions/NN-slug.ipynb`` -> ``notebooks/NN-slug.ipynb`` and
    ``solutions/NN-slug-lab.ipynb`` -> ``labs/NN-slug-lab.ipynb`` (folders beside ``solutions/``).
    Without arguments, every master of the course. Deterministic: running it twice changes
    nothing, and a file whose content is already right is not rewritten. ``--check`` writes
    nothing and exits 1 naming every stale, missing or orphaned learner file (for CI).
``perfcourse reset NOTEBOOK``
    Put a learner notebook (``notebooks/`` or ``labs/``) back as it was handed out, from its
    master; the learner's copy is kept first under ``data/backups/`` (git-ignored, never
    overwritten: each backup has its own time stamp).
``perfcourse outputs [MASTERS] [--timeout S]``
    Re-execute masters in place with nbclient (kernel ``python3``, working directory the
    notebook's folder, a time limit per cell) to refresh their committed outputs.

What a learner version is
-------------------------
* Code cells: each block from a line ``### BEGIN SOLUTION`` to a line ``### END SOLUTION`` is
  replaced by a stub (rules below). Markers stand alone on their line, at any indentation.
* Markdown cells: everything from ``<!-- BEGIN SOLUTION -->`` to ``<!-- END SOLUTION -->`` is
  removed; a line ``<!-- STUB: text -->`` inside the block is kept as ``text``. A markdown cell
  left empty is dropped.
* Cells tagged ``solution-only``, or whose first line is ``### SOLUTION ONLY`` (code) or
  ``<!-- SOLUTION ONLY -->`` (markdown), are dropped.
* Test markers (a line ``# NBVAL_IGNORE_OUTPUT``, ``# NBVAL_SKIP``, ...) become the cell tags
  nbval reads (``nbval-ignore-output``, ...), so a learner never reads them in the code.
* Outputs and execution counts are cleared. Notebook metadata is what JupyterLab itself writes
  when it opens the notebook (``kernelspec`` of ipykernel's ``python3``, the ``language_info``
  of this Python), so opening an untouched learner version does not mark it modified; ``--check``
  ignores the Python version there. Cell metadata keeps only ``tags`` (widget state, timings,
  collapsed state are dropped). Cell ids are kept from the master (nbformat 4.5 needs them); missing or
  duplicate ids get a stable id derived from the notebook name and the cell's position.

Stub rules (what replaces a code solution block)
------------------------------------------------
1. Explicit: each line ``### STUB: code`` inside the block becomes ``code`` at the indentation of
   the marker (``    ### STUB: return []`` -> ``    return []``). When the block has STUB lines,
   only they are kept. In the master they are comments, so they do not run.
2. Default, block inside a function body (a ``def`` encloses the BEGIN marker):
   ``raise NotImplementedError("Your code here")`` at the marker's indentation. The function can
   still be defined (the cell runs); calling it raises, and ``check`` reports "Not written yet"
   as an ``AssertionError``.
3. Default, top-level block: each top-level ``name = ...`` / ``name: T = ...`` assignment becomes
   ``name = ...`` (Ellipsis: ``check`` reports "No answer yet" as an ``AssertionError``); each
   top-level ``def`` keeps its header and docstring and gets the body of rule 2; imports and other
   statements are dropped (``assign`` warns, since names they define would be undefined: give a
   STUB line then). A block that yields nothing becomes ``...``.
4. Default, an indented block not inside a function (a loop or ``with`` body): ``...``, with a
   warning to add a STUB line.

The stubs never raise when their cell runs, so a learner version runs through; only the check
that grades it fails, with ``AssertionError``. A non-graded cell that *uses* a learner's function
or answer would still fail in the learner version: ``perfcourse grade --expect-untouched`` in CI
catches that, so keep later cells independent of exercise answers.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import platform
import re
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from .config import course_root as find_course_root
from .config import data_dir
from .grading.bank import graded_ids
from .grading.runner import nocolor_ipython_dir

__all__ = [
    "BEGIN",
    "CELL_ID",
    "END",
    "MASTER_NAME",
    "MD_BEGIN",
    "MD_END",
    "MD_STUB",
    "NOT_IMPLEMENTED",
    "jupyterlab_metadata",
    "MARKER_TAGS",
    "markers_to_tags",
    "RAISES_TAG",
    "SOLUTION_ONLY_CODE",
    "SOLUTION_ONLY_MD",
    "SOLUTION_ONLY_TAG",
    "STUB",
    "all_masters",
    "assign",
    "AssignResult",
    "AuthoringError",
    "clean_metadata",
    "course_root",
    "learner_notebook",
    "learner_path",
    "main_assign",
    "main_reset",
    "reset",
    "main_outputs",
    "refresh_outputs",
    "render",
    "strip_markdown",
    "stub_code",
    "StubWarning",
]

BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION[ \t]*$")
END = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
STUB = re.compile(r"^(?P<indent>[ \t]*)### STUB:(?: (?P<code>.*))?$")
MD_BEGIN = re.compile(r"^\s*<!--\s*BEGIN SOLUTION\s*-->\s*$")
MD_END = re.compile(r"^\s*<!--\s*END SOLUTION\s*-->\s*$")
MD_STUB = re.compile(r"^\s*<!--\s*STUB:\s?(?P<text>.*?)\s*-->\s*$")
SOLUTION_ONLY_TAG = "solution-only"
#: The tag JupyterLab, nbclient and nbval honour to go on past a cell that raises.
RAISES_TAG = "raises-exception"
SOLUTION_ONLY_CODE = re.compile(r"^\s*### SOLUTION ONLY\s*$")
SOLUTION_ONLY_MD = re.compile(r"^\s*<!--\s*SOLUTION ONLY\s*-->\s*$")
NOT_IMPLEMENTED = 'raise NotImplementedError("Your code here")'
CELL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MASTER_NAME = re.compile(r"^\d{2}-[a-z0-9][a-z0-9-]*\.ipynb$")


class AuthoringError(ValueError):
    """A master notebook is malformed (unbalanced markers, ...): the message names the cell."""


class StubWarning(UserWarning):
    """A default stub may not leave the learner version in a gradable state."""


# --------------------------------------------------------------------------------------------
# Stubs


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _inside_function(lines: list[str], index: int, indent: str) -> bool:
    """Whether a ``def`` encloses line ``index`` (indentation ``indent``), scanning upwards."""
    level = len(indent.expandtabs())
    for line in reversed(lines[:index]):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        width = len(_indent_of(line).expandtabs())
        if width < level:
            if re.match(r"(async\s+)?def\s", stripped):
                return True
            level = width
            if level == 0:
                return False
    return False


def _top_level_stub(block: list[str], where: str) -> list[str]:
    source = textwrap.dedent("\n".join(block))
    try:
        tree = ast.parse(source)
    except SyntaxError:
        # IPython syntax (magics) in the block: fall back to assignments found by pattern.
        names = re.findall(r"^([A-Za-z_]\w*)\s*(?::[^=]+)?=(?!=)", source, flags=re.M)
        if not names:
            warnings.warn(f"{where}: cannot parse the solution block; add a '### STUB:' line",
                          StubWarning, stacklevel=2)
            return ["..."]
        return [f"{name} = ..." for name in dict.fromkeys(names)]
    src_lines = source.splitlines()
    out: list[str] = []
    dropped: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            out.append(" = ".join(t.id for t in node.targets) + " = ...")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.append(f"{node.target.id}: {ast.get_source_segment(source, node.annotation)} = ...")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            body = node.body
            has_doc = (
                body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
            )
            header_end = body[0].lineno - 1 if not has_doc else body[0].end_lineno
            if not has_doc and body[0].lineno == node.lineno:  # def f(): return 1
                raise AuthoringError(f"{where}: put the body of {node.name}() on its own line")
            out.extend(src_lines[first - 1 : header_end])
            out.append(_indent_of(src_lines[body[0].lineno - 1]) + NOT_IMPLEMENTED)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        else:
            dropped.append(type(node).__name__)
    if dropped:
        warnings.warn(
            f"{where}: the default stub drops top-level {', '.join(dropped)} statement(s); "
            "add '### STUB:' lines if later code needs what they define",
            StubWarning, stacklevel=2,
        )
    return out or ["..."]


def _stub_for(block: list[str], indent: str, in_function: bool, where: str) -> list[str]:
    explicit = [m for m in map(STUB.match, block) if m]
    if explicit:
        return [m.group("indent") + m.group("code") for m in explicit if (m.group("code") or "").strip()]
    if in_function:
        return [indent + NOT_IMPLEMENTED]
    if indent:
        warnings.warn(f"{where}: an indented solution block outside a function becomes '...'; "
                      "add a '### STUB:' line", StubWarning, stacklevel=2)
        return [indent + "..."]
    return _top_level_stub(block, where)


def stub_code(source: str, where: str = "cell") -> str:
    """The learner version of a code cell's source (see the module docstring for the rules)."""
    lines = source.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        begin = BEGIN.match(line)
        if END.match(line) or (STUB.match(line) and not begin):
            raise AuthoringError(f"{where}: line {i + 1} ({line.strip()}) outside a solution block")
        if not begin:
            out.append(line)
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not END.match(lines[j]):
            if BEGIN.match(lines[j]):
                raise AuthoringError(f"{where}: nested ### BEGIN SOLUTION at line {j + 1}")
            j += 1
        if j == len(lines):
            raise AuthoringError(f"{where}: ### BEGIN SOLUTION at line {i + 1} has no END")
        indent = begin.group("indent")
        block = lines[i + 1 : j]
        out.extend(_stub_for(block, indent, _inside_function(lines, i, indent), where))
        i = j + 1
    return "\n".join(out)


def strip_markdown(source: str, where: str = "cell") -> str:
    """The learner version of a markdown cell's source: solution blocks removed."""
    out: list[str] = []
    inside = False
    for n, line in enumerate(source.split("\n"), 1):
        if MD_BEGIN.match(line):
            if inside:
                raise AuthoringError(f"{where}: nested <!-- BEGIN SOLUTION --> at line {n}")
            inside = True
        elif MD_END.match(line):
            if not inside:
                raise AuthoringError(f"{where}: <!-- END SOLUTION --> at line {n} without BEGIN")
            inside = False
        elif inside:
            stub = MD_STUB.match(line)
            if stub:
                out.append(stub.group("text"))
        else:
            out.append(line)
    if inside:
        raise AuthoringError(f"{where}: <!-- BEGIN SOLUTION --> has no END")
    return "\n".join(out).strip("\n")


# --------------------------------------------------------------------------------------------
# Notebooks


def _solution_only(cell) -> bool:
    if SOLUTION_ONLY_TAG in cell.get("metadata", {}).get("tags", []):
        return True
    first = cell.source.split("\n", 1)[0]
    pattern = SOLUTION_ONLY_CODE if cell.cell_type == "code" else SOLUTION_ONLY_MD
    return bool(pattern.match(first))


def _stable_id(name: str, index: int, taken: set[str]) -> str:
    n = 0
    while True:
        cid = hashlib.sha1(f"{name}:{index}:{n}".encode()).hexdigest()[:8]
        if cid not in taken:
            return cid
        n += 1


#: Test markers an author may write on a line of its own, and the cell tag nbval reads instead.
MARKER_TAGS = {
    "# NBVAL_IGNORE_OUTPUT": "nbval-ignore-output",
    "# NBVAL_SKIP": "nbval-skip",
    "# NBVAL_CHECK_OUTPUT": "nbval-check-output",
    "# NBVAL_RAISES_EXCEPTION": RAISES_TAG,
}


def markers_to_tags(cell) -> None:
    """Move test-marker lines of a code cell into its tags (in place)."""
    lines = cell.source.split("\n")
    found = [MARKER_TAGS[line.strip()] for line in lines if line.strip() in MARKER_TAGS]
    if not found:
        return
    cell.source = "\n".join(line for line in lines if line.strip() not in MARKER_TAGS).strip("\n")
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    tags.extend(tag for tag in found if tag not in tags)


def jupyterlab_metadata() -> dict:
    """The notebook metadata JupyterLab writes on opening a notebook with ipykernel's python3."""
    return {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {
            "codemirror_mode": {"name": "ipython", "version": 3},
            "file_extension": ".py",
            "mimetype": "text/x-python",
            "name": "python",
            "nbconvert_exporter": "python",
            "pygments_lexer": "ipython3",
            "version": platform.python_version(),
        },
    }


def _without_python_version(text: str) -> str:
    return re.sub(r'("pygments_lexer": "ipython3",\s*"version": )"[^"]*"', r'\1""', text)


def clean_metadata(nb, name: str, keep_cell_ids: bool = True) -> None:
    """JupyterLab's notebook metadata, minimal cell metadata, stable cell ids, nbformat 4.5."""
    nb.metadata = jupyterlab_metadata()
    nb.nbformat, nb.nbformat_minor = 4, max(nb.get("nbformat_minor", 5), 5)
    taken: set[str] = set()
    for index, cell in enumerate(nb.cells):
        tags = [t for t in cell.get("metadata", {}).get("tags", []) if t != SOLUTION_ONLY_TAG]
        cell.metadata = {"tags": tags} if tags else {}
        cid = cell.get("id") if keep_cell_ids else None
        if not cid or not CELL_ID.match(cid) or cid in taken:
            cid = _stable_id(name, index, taken)
        cell["id"] = cid
        taken.add(cid)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        elif "outputs" in cell:  # malformed but seen in hand-edited files
            del cell["outputs"]


def learner_notebook(master_path: Path):
    """Build (in memory) the learner version of the master at ``master_path``."""

    nb = nbformat.read(str(master_path), as_version=4)
    cells = []
    for index, cell in enumerate(nb.cells):
        where = f"{master_path.name} cell {index}"
        if _solution_only(cell):
            continue
        if cell.cell_type == "code":
            markers_to_tags(cell)
            cell.source = stub_code(cell.source, where)
            if graded_ids(cell.source):
                # An unanswered check fails; Run All (JupyterLab, nbclient) goes on past it.
                tags = cell.setdefault("metadata", {}).setdefault("tags", [])
                if RAISES_TAG not in tags:
                    tags.append(RAISES_TAG)
        elif cell.cell_type == "markdown":
            cell.source = strip_markdown(cell.source, where)
            if not cell.source.strip():
                continue
        cells.append(cell)
    nb.cells = cells
    clean_metadata(nb, master_path.name)
    return nb


def render(nb) -> str:
    """The exact text written for a notebook (nbformat's layout, one trailing newline)."""

    nbformat.validate(nb)
    return nbformat.writes(nb, version=4).rstrip("\n") + "\n"


def learner_path(master_path: Path) -> Path:
    """``<root>/solutions/NN-slug.ipynb`` -> ``<root>/notebooks/...``; ``-lab`` -> ``<root>/labs/``."""
    master_path = Path(master_path)
    if master_path.parent.name != "solutions":
        raise AuthoringError(f"{master_path}: masters live in a folder named solutions/")
    folder = "labs" if master_path.stem.endswith("-lab") else "notebooks"
    return master_path.parent.parent / folder / master_path.name


def course_root(start: Path | None = None) -> Path:
    """The course checkout (see :func:`perfcourse.config.course_root`); an error outside one."""
    root = find_course_root(start)
    if root is None or not (root / "solutions").is_dir():
        raise AuthoringError("No solutions/ folder here or above: run this in the course checkout")
    return root


def all_masters(root: Path) -> list[Path]:
    return sorted((root / "solutions").glob("*.ipynb"))


@dataclass
class AssignResult:
    written: list[Path]
    unchanged: list[Path]
    stale: list[Path]  # only filled by check mode: differs from what assign would write
    orphans: list[Path]  # learner files without a master (check mode, whole course only)


def assign(masters: list[Path] | None = None, *, check: bool = False,
           root: Path | None = None) -> AssignResult:
    """Generate (or with ``check``, verify) the learner versions of ``masters`` (default: all)."""
    whole_course = not masters
    root = root or course_root()
    masters = [Path(m) for m in masters] if masters else all_masters(root)
    result = AssignResult([], [], [], [])
    for master in masters:
        if not MASTER_NAME.match(master.name):
            warnings.warn(f"{master.name}: master names look like NN-slug.ipynb", StubWarning,
                          stacklevel=2)
        target = learner_path(master)
        text = render(learner_notebook(master))
        current = target.read_text(encoding="utf-8") if target.is_file() else None
        if current == text or (
            check and current is not None and _without_python_version(current) == _without_python_version(text)
        ):
            result.unchanged.append(target)
        elif check:
            result.stale.append(target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", newline="\n")
            result.written.append(target)
    if check and whole_course:
        expected = {learner_path(m).resolve() for m in masters}
        for folder in ("notebooks", "labs"):
            for path in sorted((root / folder).glob("*.ipynb")):
                if path.resolve() not in expected:
                    result.orphans.append(path)
    return result


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main_assign(argv: list[str] | None = None) -> int:
    """``perfcourse assign``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="perfcourse assign",
        description="Generate learner notebooks (notebooks/, labs/) from the masters in solutions/.",
    )
    parser.add_argument("masters", nargs="*", type=Path, help="master notebooks (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a learner file is stale, missing or orphaned")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StubWarning)
            result = assign(args.masters or None, check=args.check)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except (AuthoringError, OSError) as exc:
        print(f"perfcourse assign: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = [(p, "stale or missing: run `perfcourse assign`") for p in result.stale]
        problems += [(p, "has no master in solutions/") for p in result.orphans]
        for path, why in problems:
            print(f"{_relative(path)}: {why}")
        if not problems:
            print(f"{len(result.unchanged)} learner notebook(s) up to date")
        return 1 if problems else 0
    for path in result.written:
        print(f"wrote {_relative(path)}")
    print(f"{len(result.written)} written, {len(result.unchanged)} unchanged")
    return 0


# --------------------------------------------------------------------------------------------
# Refreshing the masters' outputs


def refresh_outputs(master: Path, timeout: int = 120, kernel_name: str = "python3") -> None:
    """Execute ``master`` top to bottom in a fresh kernel and write it back with its outputs."""


    master = Path(master)
    nb = nbformat.read(str(master), as_version=4)
    with tempfile.TemporaryDirectory(prefix="perfcourse-outputs-") as tmp:
        previous = os.environ.get("IPYTHONDIR")
        os.environ["IPYTHONDIR"] = str(nocolor_ipython_dir(Path(tmp)))
        try:
            client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                                    resources={"metadata": {"path": str(master.parent)}})
            client.execute()
        except CellTimeoutError as exc:
            raise AuthoringError(f"{master.name}: a cell ran longer than {timeout} s") from exc
        except CellExecutionError as exc:
            raise AuthoringError(f"{master.name}: a cell failed: {exc.ename}: {exc.evalue}") from None
        finally:
            if previous is None:
                os.environ.pop("IPYTHONDIR", None)
            else:
                os.environ["IPYTHONDIR"] = previous
    nb.metadata = jupyterlab_metadata()  # no widget state; what JupyterLab writes on open
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)  # timestamps would churn every run
    master.write_text(render(nb), encoding="utf-8", newline="\n")


def master_of(learner: Path) -> Path:
    """``<root>/notebooks/NN-slug.ipynb`` or ``<root>/labs/...`` -> ``<root>/solutions/...``."""
    learner = Path(learner).resolve()
    if learner.parent.name not in ("notebooks", "labs"):
        raise AuthoringError(
            f"{learner.name}: reset restores learner notebooks, the ones in notebooks/ or labs/"
        )
    master = learner.parent.parent / "solutions" / learner.name
    if not master.is_file():
        raise AuthoringError(f"{learner.name}: no master solutions/{learner.name} to restore it from")
    return master


def reset(learner: Path, *, backups: Path | None = None) -> Path | None:
    """Restore ``learner`` from its master; return where the learner's copy was kept (or None).

    The copy goes to ``backups`` (default ``data/backups/``) as ``NN-slug.<time>.ipynb``; a
    notebook already as handed out is left alone and gets no backup.
    """
    learner = Path(learner)
    text = render(learner_notebook(master_of(learner)))
    if learner.is_file() and learner.read_text(encoding="utf-8") == text:
        return None
    kept = None
    if learner.is_file():
        folder = Path(backups) if backups else data_dir() / "backups"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = folder / f"{learner.stem}.{stamp}.ipynb"
        n = 1
        while kept.exists():
            n += 1
            kept = folder / f"{learner.stem}.{stamp}-{n}.ipynb"
        kept.write_bytes(learner.read_bytes())
    learner.write_text(text, encoding="utf-8", newline="\n")
    return kept


def main_reset(argv: list[str] | None = None) -> int:
    """``perfcourse reset NOTEBOOK``: restore a learner notebook, keeping a backup."""
    parser = argparse.ArgumentParser(
        prog="perfcourse reset",
        description="Put a learner notebook back as it was handed out; your copy is kept in "
        "data/backups/ first.",
    )
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebooks/NN-....ipynb or labs/...")
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        try:
            kept = reset(notebook)
        except AuthoringError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if kept is None:
            print(f"{notebook}: already as handed out, nothing to do")
        else:
            print(f"{notebook}: restored; your copy is kept as {_relative(kept)}")
    print("If the notebook is open in JupyterLab, reload it (File > Reload Notebook from Disk).")
    return 0


def main_outputs(argv: list[str] | None = None) -> int:
    """``perfcourse outputs``: re-execute masters in place to refresh their committed outputs."""
    parser = argparse.ArgumentParser(
        prog="perfcourse outputs",
        description="Re-execute master notebooks in place (nbclient) to refresh their outputs.",
    )
    parser.add_argument("masters", nargs="*", type=Path, help="master notebooks (default: all)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    parser.add_argument("--kernel", default="python3", help="kernel name (default python3)")
    args = parser.parse_args(argv)
    try:
        masters = args.masters or all_masters(course_root())
    except AuthoringError as exc:
        print(f"perfcourse outputs: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for master in masters:
        try:
            refresh_outputs(master, timeout=args.timeout, kernel_name=args.kernel)
            print(f"refreshed {_relative(master)}")
        except (AuthoringError, OSError) as exc:
            failed += 1
            print(f"perfcourse outputs: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # python -m perfcourse.authoring [assign|outputs] ARGS
    _argv = sys.argv[1:]
    _command = _argv.pop(0) if _argv and _argv[0] in ("assign", "outputs") else "assign"
    raise SystemExit((main_outputs if _command == "outputs" else main_assign)(_argv))
