"""``perfcourse grade``: run saved notebooks, print a per-question table and a score.

Each notebook runs in its own ``pytest`` subprocess with nbval in lax mode (every cell must run;
only cells tagged ``nbval-check-output`` have their output compared, after the course's
sanitize file), in the current environment's kernel, colours off, each cell under a time limit.
The :mod:`perfcourse.grading.nbplugin` plugin records each cell; a cell that calls
``check("NN.qK", ...)`` is a graded cell. When the notebook's master is present
(``solutions/<same name>``), a question of the master with no check cell in the notebook counts as
failed, so deleting a check cell does not raise a score.

Modes:

* default: print the table and ``score: k/N`` per notebook; exit 0 when grading ran. Without
  paths (every notebook of ``notebooks/`` and ``labs/``) it is the learner's progress: a summary
  with the questions still open, also written to ``data/progress.html`` for an instructor.
* ``--expect-full`` (masters in CI): exit 0 only if every check passed and every cell ran.
* ``--expect-untouched`` (untouched learner versions in CI): exit 0 only if every graded check
  failed with ``AssertionError`` and every other cell ran.

Run serially: the plugin is not xdist-safe.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path

import nbformat

from ..config import course_root, data_dir
from .bank import RIGHT_MARK, graded_ids, load_bank
from .nbplugin import REPORT_ENV

__all__ = [
    "DEFAULT_CELL_TIMEOUT",
    "SAVE_REMINDER",
    "default_notebooks",
    "format_result",
    "format_summary",
    "full_problems",
    "grade_notebook",
    "main_grade",
    "nocolor_ipython_dir",
    "progress_page",
    "write_progress_page",
    "NotebookResult",
    "QuestionResult",
    "sanitize_file",
    "untouched_problems",
]

DEFAULT_CELL_TIMEOUT = 300
SAVE_REMINDER = "Grading the saved files: save your notebook first (Ctrl+S / Cmd+S in Jupyter)."


def sanitize_file() -> Path:
    """The course's nbval sanitize file (``perfcourse/grading/sanitize.cfg``)."""
    return Path(str(resources.files("perfcourse.grading") / "sanitize.cfg"))


@dataclass
class QuestionResult:
    qid: str
    title: str
    right: bool
    hint: str = ""
    #: "right", "wrong" (AssertionError), "error" (another exception), "not run", "missing"
    status: str = "right"


@dataclass
class NotebookResult:
    path: Path
    questions: list[QuestionResult] = field(default_factory=list)
    other_cells: int = 0
    other_failures: list[str] = field(default_factory=list)
    error: str | None = None  # grading could not run at all

    @property
    def score(self) -> tuple[int, int]:
        return sum(q.right for q in self.questions), len(self.questions)


def nocolor_ipython_dir(parent: Path) -> Path:
    """An IPYTHONDIR whose default profile turns colours off (clean tracebacks and hints)."""
    profile = Path(parent) / "ipython" / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_config.py").write_text(
        'c = get_config()  # noqa: F821\nc.InteractiveShell.colors = "nocolor"\n', encoding="utf-8"
    )
    return profile.parent


def default_notebooks() -> list[Path]:
    root = course_root()
    if root is None:
        return []
    return sorted((root / "notebooks").glob("*.ipynb")) + sorted((root / "labs").glob("*.ipynb"))


def _master_of(path: Path) -> Path | None:
    master = path.resolve().parent.parent / "solutions" / path.name
    return master if master.is_file() and master.resolve() != path.resolve() else None


def _master_qids(master: Path) -> list[str]:
    nb = nbformat.read(str(master), as_version=4)
    found: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            found += [q for q in graded_ids(cell.source) if q not in found]
    return found


def _run_pytest(path: Path, timeout: int, tmp: Path, verbose: bool) -> tuple[dict | None, str]:
    report = tmp / "report.json"
    ini = tmp / "pytest.ini"
    ini.write_text("[pytest]\n", encoding="utf-8")
    cmd = [
        sys.executable, "-m", "pytest", str(path),
        "--nbval-lax", "--nbval-current-env",
        f"--nbval-cell-timeout={timeout}",
        f"--nbval-sanitize-with={sanitize_file()}",
        "-p", "perfcourse.grading.nbplugin",
        "-p", "no:cacheprovider",
        "--noconftest", "-c", str(ini), f"--rootdir={path.parent}",
        "--color=no", "-q", "--tb=line",
    ]
    env = dict(os.environ)
    env[REPORT_ENV] = str(report)
    env["IPYTHONDIR"] = str(nocolor_ipython_dir(tmp))
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(cmd, env=env, cwd=path.parent, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if verbose:
        print(output)
    if not report.is_file():
        return None, output
    return json.loads(report.read_text(encoding="utf-8")), output


def _failure_text(cell: dict) -> str:
    if cell.get("ename"):
        return f"{cell['ename']}: {cell.get('evalue') or ''}".strip().rstrip(":")
    return cell.get("message") or "failed"


def _results_from(report: dict, path: Path, titles: dict[str, str]) -> NotebookResult:
    result = NotebookResult(path)
    by_qid: dict[str, QuestionResult] = {}
    for cell in report["cells"]:
        qids = cell["qids"]
        if not qids:
            result.other_cells += 1
            if cell["outcome"] == "failed":
                result.other_failures.append(
                    f"code cell {cell['cell']} ({cell.get('first_line', '')}): {_failure_text(cell)}")
            continue
        confirmed = {q for q in qids if f"{RIGHT_MARK} {q} right" in cell["stdout"]}
        failed_one = False
        for qid in qids:
            title = titles.get(qid, "?")
            if cell["outcome"] == "passed" or qid in confirmed:
                res = QuestionResult(qid, title, True)
            elif cell["outcome"] == "skipped":
                res = QuestionResult(qid, title, False, "the check cell was skipped", "not run")
            elif failed_one:
                res = QuestionResult(qid, title, False,
                                     "not reached: an earlier check in the same cell failed",
                                     "not run")
            else:
                failed_one = True
                if cell.get("ename") == "AssertionError":
                    res = QuestionResult(qid, title, False, cell.get("evalue") or "", "wrong")
                elif cell.get("ename"):
                    res = QuestionResult(qid, title, False,
                                         f"the cell raised {_failure_text(cell)}", "error")
                else:
                    res = QuestionResult(qid, title, False, _failure_text(cell), "error")
            by_qid[qid] = res  # a question checked twice: the last check counts
    master = _master_of(path)
    expected = _master_qids(master) if master else []
    for qid in expected:
        if qid not in by_qid:
            by_qid[qid] = QuestionResult(
                qid, titles.get(qid, "?"), False,
                "no check cell for this question in the notebook (deleted?)", "missing")
    order = expected + [q for q in by_qid if q not in expected]
    result.questions = [by_qid[q] for q in order]
    return result


def grade_notebook(path: Path, *, timeout: int = DEFAULT_CELL_TIMEOUT,
                   verbose: bool = False) -> NotebookResult:
    """Run one saved notebook and collect its per-question results."""
    path = Path(path)
    if not path.is_file():
        return NotebookResult(path, error=f"no such notebook: {path}")
    try:
        titles = {qid: q.title for qid, q in load_bank().items()}
    except Exception as exc:  # noqa: BLE001 - a broken bank is reported, grading goes on
        titles = {}
        print(f"warning: the question bank did not load: {exc}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="perfcourse-grade-") as tmp:
        report, output = _run_pytest(path.resolve(), timeout, Path(tmp), verbose)
    if report is None:
        tail = "\n".join(output.strip().splitlines()[-15:])
        return NotebookResult(path, error=f"pytest did not run the notebook:\n{tail}")
    if report.get("collect_errors"):
        first = report["collect_errors"][0]["message"].strip().splitlines()
        return NotebookResult(path, error="the notebook could not be read: " + (first[-1] if first else "?"))
    return _results_from(report, path, titles)


# --------------------------------------------------------------------------------------------
# Printing


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def format_result(result: NotebookResult, width: int = 100) -> str:
    lines = [_display(result.path)]
    if result.error:
        lines.append(f"  could not grade: {result.error}")
        return "\n".join(lines)
    if result.questions:
        title_w = min(max(len(q.title) for q in result.questions), 36)
        title_w = max(title_w, len("title"))
        lines.append(f"  {'question':<9} {'title':<{title_w}}  ok  hint")
        indent = 2 + 9 + 1 + title_w + 2 + 2 + 2
        for q in result.questions:
            title = q.title if len(q.title) <= title_w else q.title[: title_w - 1] + "…"
            mark = "✓" if q.right else "✗"
            hint_lines = textwrap.wrap(q.hint, max(width - indent, 30)) or [""]
            lines.append(f"  {q.qid:<9} {title:<{title_w}}  {mark:<2}  {hint_lines[0]}".rstrip())
            lines += [" " * indent + extra for extra in hint_lines[1:]]
    else:
        lines.append("  no graded questions in this notebook")
    failed = len(result.other_failures)
    lines.append(f"  other cells: {result.other_cells - failed} ran, {failed} failed")
    lines += [f"    {text}" for text in result.other_failures]
    k, n = result.score
    lines.append(f"score: {k}/{n}")
    return "\n".join(lines)


def _open_questions(result: NotebookResult) -> list[QuestionResult]:
    return [q for q in result.questions if not q.right]


def format_summary(results: list[NotebookResult]) -> str:
    """One line per notebook: its score and the questions still open."""
    name_w = max(len(_display(r.path)) for r in results)
    lines = ["summary", f"  {'notebook':<{name_w}}  score  still open"]
    total_k = total_n = 0
    for r in results:
        if r.error:
            lines.append(f"  {_display(r.path):<{name_w}}  not graded")
            continue
        k, n = r.score
        total_k, total_n = total_k + k, total_n + n
        still_open = ", ".join(q.qid for q in _open_questions(r)) or "-"
        lines.append(f"  {_display(r.path):<{name_w}}  {f'{k}/{n}':<5}  {still_open}")
    lines.append(f"total score: {total_k}/{total_n}")
    return "\n".join(lines)


def progress_page(results: list[NotebookResult], *, who: str, when: str) -> str:
    """The progress table as a self-contained HTML page (for an instructor to collect)."""
    rows = []
    total_k = total_n = 0
    for r in results:
        name = escape(r.path.name)
        if r.error:
            rows.append(f"<tr><td>{name}</td><td>not graded</td><td>{escape(r.error[:200])}</td></tr>")
            continue
        k, n = r.score
        total_k, total_n = total_k + k, total_n + n
        still_open = "".join(
            f"<li><b>{escape(q.qid)}</b> {escape(q.title)}: <i>{escape(q.hint[:160])}</i></li>"
            for q in _open_questions(r)
        )
        done = ' class="done"' if k == n else ""
        rows.append(f"<tr{done}><td>{name}</td><td>{k}/{n}</td><td><ul>{still_open}</ul></td></tr>")
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>perfcourse progress</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}tr.done{background:#e8f5e9}"
        "ul{margin:0;padding-left:1.2em}</style></head><body>\n"
        f"<h1>perfcourse progress</h1><p>{escape(who)}, graded {escape(when)}: "
        f"<b>{total_k}/{total_n}</b> questions right.</p>\n"
        "<table><tr><th>notebook</th><th>score</th><th>still open (with the last hint)</th></tr>\n"
        + "\n".join(rows) + "\n</table></body></html>\n"
    )


def write_progress_page(results: list[NotebookResult], path: Path | None = None) -> Path:
    """Write :func:`progress_page` to ``path`` (default ``data/progress.html``); return it."""
    path = Path(path) if path else data_dir() / "progress.html"
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no user name in a minimal container
        who = "this learner"
    path.write_text(progress_page(results, who=who, when=time.strftime("%Y-%m-%d %H:%M")),
                    encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# CI verdicts


def untouched_problems(result: NotebookResult) -> list[str]:
    """Why ``result`` is not what an untouched learner version should give ([] when it is)."""
    if result.error:
        return [f"{_display(result.path)}: {result.error}"]
    problems = []
    for q in result.questions:
        if q.right:
            problems.append(f"{q.qid} passed in the learner version: its stub gives the answer away")
        elif q.status == "error":
            problems.append(f"{q.qid} failed with something else than AssertionError: {q.hint}")
        elif q.status == "missing":
            problems.append(f"{q.qid}: {q.hint}")
    problems += [f"a cell that is not graded failed: {f}" for f in result.other_failures]
    return problems


def full_problems(result: NotebookResult) -> list[str]:
    """Why ``result`` is not what a master should give ([] when every check and cell passed)."""
    if result.error:
        return [f"{_display(result.path)}: {result.error}"]
    problems = [f"{q.qid} failed: {q.hint}" for q in result.questions if not q.right]
    problems += [f"a cell failed: {f}" for f in result.other_failures]
    return problems


def _expand(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.glob("*.ipynb"))
        else:
            found.append(path)
    return found


def main_grade(argv: list[str] | None = None) -> int:
    """``perfcourse grade [PATHS] [--expect-full | --expect-untouched] [--timeout S] [-v]``."""
    parser = argparse.ArgumentParser(
        prog="perfcourse grade",
        description="Run saved notebooks and print a per-question table and a score.",
    )
    parser.add_argument("paths", nargs="*", type=Path,
                        help="notebooks or folders (default: every notebook in notebooks/ and labs/)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--expect-full", action="store_true",
                      help="exit 0 only if every check passed and every cell ran (masters, CI)")
    mode.add_argument("--expect-untouched", action="store_true",
                      help="exit 0 only if every graded check failed with AssertionError and "
                      "every other cell ran (untouched learner versions, CI)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_CELL_TIMEOUT,
                        help=f"seconds a cell may run (default {DEFAULT_CELL_TIMEOUT})")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's output too")
    args = parser.parse_args(argv)


    if not all(importlib.util.find_spec(m) for m in ("pytest", "nbval")):
        print("perfcourse grade needs pytest and nbval: pip install \"perfcourse[test]\" "
              "(or: pip install pytest nbval)", file=sys.stderr)
        return 2
    paths = _expand(args.paths) if args.paths else default_notebooks()
    if not paths:
        print("perfcourse grade: no notebooks to grade (run it in the course folder, or name "
              "the notebook)", file=sys.stderr)
        return 2
    if not (args.expect_full or args.expect_untouched):
        print(SAVE_REMINDER)
    results = []
    problems: list[str] = []
    for path in paths:
        result = grade_notebook(path, timeout=args.timeout, verbose=args.verbose)
        results.append(result)
        print(format_result(result), flush=True)
        print()
        if args.expect_untouched:
            problems += [f"{_display(path)}: {p}" for p in untouched_problems(result)]
        elif args.expect_full:
            problems += [f"{_display(path)}: {p}" for p in full_problems(result)]
    if len(results) > 1 or not args.paths:
        print(format_summary(results))
    if not (args.paths or args.expect_untouched or args.expect_full):
        page = write_progress_page(results)
        print(f"progress page: {_display(page)} (open it in a browser, or hand it to your instructor)")
    if args.expect_untouched or args.expect_full:
        wanted = "untouched" if args.expect_untouched else "full"
        if problems:
            print(f"\nexpect-{wanted}: FAILED")
            for p in problems:
                print(f"  {p}")
            return 1
        print(f"expect-{wanted}: OK")
        return 0
    return 2 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main_grade(sys.argv[1:]))
