"""perfcourse assign: learner versions generated from masters, deterministic, checkable."""

from __future__ import annotations

import platform
import warnings

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from perfcourse.authoring import (
    AuthoringError,
    StubWarning,
    assign,
    learner_notebook,
    learner_path,
    main_assign,
    strip_markdown,
    stub_code,
)


def make_master(root, name="00-demo.ipynb", cells=None):
    nb = new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"},
        "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}},
    })
    nb.cells = cells if cells is not None else [
        new_markdown_cell("# Demo\nScope: testing."),
        new_code_cell("from perfcourse.grading import check", execution_count=1),
        new_code_cell('### BEGIN SOLUTION\nanswer = "a"\n### END SOLUTION\ncheck("00.q1", answer)',
                      execution_count=2,
                      outputs=[new_output("stream", name="stdout", text="✓ 00.q1 right\n")],
                      metadata={"tags": ["graded"], "execution": {"iopub.status.busy": "x"},
                                "scrolled": True}),
        new_code_cell("def mean_latency_ms(samples_s):\n    \"\"\"Mean, in ms.\"\"\"\n"
                      "    ### BEGIN SOLUTION\n    return sum(samples_s) / len(samples_s) * 1000\n"
                      "    ### END SOLUTION", execution_count=3),
        new_code_cell('check("00.q3", mean_latency_ms)', execution_count=4),
        new_markdown_cell("Why?\n<!-- BEGIN SOLUTION -->\nBecause SQLite.\n<!-- END SOLUTION -->"),
        new_markdown_cell("<!-- SOLUTION ONLY -->\nInstructor notes."),
        new_code_cell("print('tagged out')", metadata={"tags": ["solution-only"]}),
    ]
    path = root / "solutions" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


# --- stubs ----------------------------------------------------------------------------------


def test_top_level_assignment_becomes_ellipsis():
    src = '### BEGIN SOLUTION\nanswer = "a"\n### END SOLUTION\ncheck("00.q1", answer)'
    assert stub_code(src) == 'answer = ...\ncheck("00.q1", answer)'


def test_block_in_function_body_raises_not_implemented():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    y = x * 2\n    return y\n    ### END SOLUTION\n"
    assert stub_code(src) == 'def f(x):\n    raise NotImplementedError("Your code here")\n'


def test_block_nested_deeper_in_function_keeps_marker_indentation():
    src = ("def f(xs):\n    for x in xs:\n        ### BEGIN SOLUTION\n        print(x)\n"
           "        ### END SOLUTION\n    return 1")
    assert stub_code(src) == (
        'def f(xs):\n    for x in xs:\n        raise NotImplementedError("Your code here")\n    return 1'
    )


def test_explicit_stub_lines_win():
    src = ("def f(x):\n    ### BEGIN SOLUTION\n    ### STUB: result = []\n    ### STUB: return result\n"
           "    return [x]\n    ### END SOLUTION")
    assert stub_code(src) == "def f(x):\n    result = []\n    return result"
    top = "### BEGIN SOLUTION\n### STUB: answer = None  # a set of letters\nanswer = {'a'}\n### END SOLUTION"
    assert stub_code(top) == "answer = None  # a set of letters"


def test_top_level_function_keeps_header_and_docstring():
    src = ('### BEGIN SOLUTION\nimport math\n\ndef p95(samples):\n    """95th percentile."""\n'
           "    s = sorted(samples)\n    return s[math.ceil(0.95 * len(s)) - 1]\n### END SOLUTION\n"
           'check("01.q2", p95)')
    assert stub_code(src) == (
        'def p95(samples):\n    """95th percentile."""\n    raise NotImplementedError("Your code here")\n'
        'check("01.q2", p95)'
    )


def test_stubbed_cells_still_run():
    namespace = {}
    exec(stub_code('### BEGIN SOLUTION\nanswer = "a"\ntotal: int = 3\n### END SOLUTION'), namespace)
    assert namespace["answer"] is Ellipsis and namespace["total"] is Ellipsis
    exec(stub_code("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION"), namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)


def test_dropped_statements_warn():
    with pytest.warns(StubWarning, match="For"):
        assert stub_code("### BEGIN SOLUTION\nfor i in range(3):\n    total = i\n### END SOLUTION") == "..."


def test_unbalanced_markers_are_errors():
    with pytest.raises(AuthoringError, match="has no END"):
        stub_code("### BEGIN SOLUTION\nx = 1")
    with pytest.raises(AuthoringError, match="outside a solution block"):
        stub_code("x = 1\n### END SOLUTION")
    with pytest.raises(AuthoringError, match="nested"):
        stub_code("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION")
    with pytest.raises(AuthoringError, match="has no END"):
        strip_markdown("<!-- BEGIN SOLUTION -->\ntext")


def test_markdown_solution_removed_and_stub_kept():
    src = ("Question?\n<!-- BEGIN SOLUTION -->\nThe answer.\n<!-- STUB: *Your answer here.* -->\n"
           "<!-- END SOLUTION -->\nAfter.")
    assert strip_markdown(src) == "Question?\n*Your answer here.*\nAfter."


# --- notebooks ------------------------------------------------------------------------------


def test_learner_paths():
    assert str(learner_path(__import__("pathlib").Path("c/solutions/01-x.ipynb"))) == "c/notebooks/01-x.ipynb"
    assert str(learner_path(__import__("pathlib").Path("c/solutions/01-x-lab.ipynb"))) == "c/labs/01-x-lab.ipynb"
    with pytest.raises(AuthoringError):
        learner_path(__import__("pathlib").Path("c/elsewhere/01-x.ipynb"))


def test_assign_writes_clean_learner_version(tmp_path):
    master = make_master(tmp_path)
    make_master(tmp_path, "00-demo-lab.ipynb")
    result = assign(root=tmp_path)
    assert sorted(p.name for p in result.written) == ["00-demo-lab.ipynb", "00-demo.ipynb"]
    assert (tmp_path / "labs" / "00-demo-lab.ipynb").is_file()
    nb = nbformat.read(str(tmp_path / "notebooks" / "00-demo.ipynb"), as_version=4)
    nbformat.validate(nb)
    text = "\n".join(c.source for c in nb.cells)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    assert 'answer = "a"' not in text and "Because SQLite" not in text
    assert "Instructor notes" not in text and "tagged out" not in text
    assert "answer = ...\ncheck(\"00.q1\", answer)" in text
    assert 'raise NotImplementedError("Your code here")' in text
    assert '"""Mean, in ms."""' in text
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        assert set(cell.metadata) <= {"tags"}
    # the graded cell keeps its tags and gains raises-exception: Run All goes on past it
    assert nb.cells[2].metadata == {"tags": ["graded", "raises-exception"]}
    # what JupyterLab writes when it opens the notebook, so opening it changes nothing
    assert nb.metadata["kernelspec"] == {
        "display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3",
    }
    assert nb.metadata["language_info"]["version"] == platform.python_version()
    assert nb.metadata["language_info"]["codemirror_mode"] == {"name": "ipython", "version": 3}
    master_ids = [c.id for c in nbformat.read(str(master), as_version=4).cells]
    assert [c.id for c in nb.cells] == master_ids[:6]  # ids kept from the master


def test_assign_is_idempotent(tmp_path):
    make_master(tmp_path)
    assign(root=tmp_path)
    target = tmp_path / "notebooks" / "00-demo.ipynb"
    first = target.read_bytes()
    mtime = target.stat().st_mtime_ns
    result = assign(root=tmp_path)
    assert result.written == [] and len(result.unchanged) == 1
    assert target.read_bytes() == first
    assert target.stat().st_mtime_ns == mtime  # not even rewritten


def test_masters_without_ids_get_stable_ids(tmp_path):
    path = make_master(tmp_path)
    raw = nbformat.read(str(path), as_version=4)
    raw.nbformat_minor = 4
    for cell in raw.cells:
        del cell["id"]
    path.write_text(nbformat.writes(raw), encoding="utf-8")
    assign(root=tmp_path)
    target = tmp_path / "notebooks" / "00-demo.ipynb"
    first = target.read_bytes()
    target.unlink()
    assign(root=tmp_path)
    assert target.read_bytes() == first
    nbformat.validate(nbformat.read(str(target), as_version=4))


def test_check_detects_stale_missing_and_orphan(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    master = make_master(tmp_path)
    assert main_assign(["--check"]) == 1
    assert "notebooks/00-demo.ipynb: stale or missing" in capsys.readouterr().out
    assert main_assign([]) == 0
    assert main_assign(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out

    nb = nbformat.read(str(master), as_version=4)
    nb.cells[0].source += "\nEdited."
    nbformat.write(nb, str(master))
    assert main_assign(["--check"]) == 1
    assert "notebooks/00-demo.ipynb: stale" in capsys.readouterr().out
    assert main_assign([str(master)]) == 0

    (tmp_path / "labs").mkdir()
    (tmp_path / "labs" / "07-gone-lab.ipynb").write_text("{}", encoding="utf-8")
    assert main_assign(["--check"]) == 1
    assert "labs/07-gone-lab.ipynb: has no master" in capsys.readouterr().out


def test_malformed_master_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_master(tmp_path, cells=[new_code_cell("### BEGIN SOLUTION\nx = 1")])
    assert main_assign([]) == 2
    assert "00-demo.ipynb cell 0" in capsys.readouterr().err


def test_no_warning_for_the_usual_forms(tmp_path):
    make_master(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StubWarning)
        assign(root=tmp_path)


# --- perfcourse outputs (real kernels) --------------------------------------------------------


@pytest.mark.slow
def test_outputs_refreshes_a_master_in_place(tmp_path, capsys):
    from perfcourse.authoring import main_outputs

    master = make_master(tmp_path, cells=[
        new_code_cell("from pathlib import Path\nprint(Path.cwd().name)"),
        new_code_cell("6 * 7"),
    ])
    assert main_outputs([str(master), "--timeout", "60"]) == 0
    nb = nbformat.read(str(master), as_version=4)
    assert nb.cells[0].outputs[0].text == "solutions\n"  # ran in the notebook's folder
    assert nb.cells[1].outputs[0].data["text/plain"] == "42"
    assert [c.execution_count for c in nb.cells] == [1, 2]
    assert "widgets" not in nb.metadata
    first = master.read_bytes()
    assert main_outputs([str(master)]) == 0
    assert master.read_bytes() == first  # deterministic outputs give identical files


@pytest.mark.slow
def test_outputs_reports_a_failing_cell_and_keeps_the_master(tmp_path, capsys):
    from perfcourse.authoring import main_outputs

    master = make_master(tmp_path, cells=[new_code_cell("1 / 0")])
    before = master.read_bytes()
    assert main_outputs([str(master)]) == 1
    assert "a cell failed: ZeroDivisionError" in capsys.readouterr().err
    assert master.read_bytes() == before


def test_test_markers_become_tags_the_learner_never_reads(tmp_path):
    nb = new_notebook(cells=[new_code_cell("# NBVAL_IGNORE_OUTPUT\nimport math\nprint(math.pi)")])
    master = tmp_path / "solutions" / "00-markers.ipynb"
    master.parent.mkdir()
    master.write_text(nbformat.writes(nb))
    learner = learner_notebook(master)
    assert learner.cells[0].source == "import math\nprint(math.pi)"
    assert learner.cells[0].metadata["tags"] == ["nbval-ignore-output"]


def test_check_ignores_only_the_python_version(tmp_path):
    make_master(tmp_path)
    assign(root=tmp_path)
    target = tmp_path / "notebooks" / "00-demo.ipynb"
    text = target.read_text()
    target.write_text(text.replace(f'"version": "{platform.python_version()}"', '"version": "3.99.0"'))
    assert assign(check=True, root=tmp_path).stale == []
    target.write_text(text.replace("Mean, in ms.", "Mean, in s."))
    assert assign(check=True, root=tmp_path).stale == [target]


def test_no_notebook_of_the_course_shows_a_test_marker():
    from perfcourse.authoring import MARKER_TAGS
    from perfcourse.config import repo_root

    shown = []
    for folder in ("solutions", "notebooks", "labs"):
        for path in sorted((repo_root() / folder).glob("*.ipynb")):
            for index, cell in enumerate(nbformat.read(str(path), as_version=4).cells):
                if any(line.strip() in MARKER_TAGS for line in cell.source.splitlines()):
                    shown.append(f"{folder}/{path.name} cell {index}")
    assert not shown, f"test markers in code (use cell tags): {shown}"


def test_reset_restores_a_learner_notebook_and_keeps_the_learners_copy(tmp_path, capsys):
    from perfcourse.authoring import main_reset, reset

    make_master(tmp_path)
    assign(root=tmp_path)
    learner = tmp_path / "notebooks" / "00-demo.ipynb"
    handed_out = learner.read_text()
    worked = handed_out.replace("answer = ...", 'answer = "b"')
    learner.write_text(worked)
    backups = tmp_path / "backups"
    kept = reset(learner, backups=backups)
    assert learner.read_text() == handed_out
    assert kept.parent == backups and kept.read_text() == worked
    assert reset(learner, backups=backups) is None  # as handed out: nothing kept twice
    learner.write_text(worked)
    second = reset(learner, backups=backups)
    assert second != kept and kept.is_file() and second.is_file()  # never overwritten
    learner.unlink()
    assert reset(learner, backups=backups) is None and learner.read_text() == handed_out
    master = tmp_path / "solutions" / "00-demo.ipynb"
    assert main_reset([str(master)]) == 2
    assert "learner notebooks" in capsys.readouterr().err
