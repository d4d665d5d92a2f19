"""Run All in a learner version goes on past unanswered checks, as JupyterLab runs it.

nbclient stops at the first cell that raises unless the cell is tagged ``raises-exception``,
exactly like JupyterLab's Run All; ``perfcourse assign`` tags every graded cell of a learner
version, and a failed check shows its hint (a red cross, the question, the hint), not a
traceback through the course's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from perfcourse.authoring import RAISES_TAG
from perfcourse.grading.bank import graded_ids

ROOT = Path(__file__).resolve().parents[1]
LEARNER = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb"))


@pytest.mark.parametrize("path", LEARNER, ids=lambda p: p.name)
def test_every_graded_cell_of_a_learner_version_lets_run_all_go_on(path):
    cells = json.loads(path.read_text())["cells"]
    graded = [c for c in cells if c["cell_type"] == "code" and graded_ids("".join(c["source"]))]
    assert graded, f"{path.name} has no graded cell"
    for cell in graded:
        assert RAISES_TAG in cell.get("metadata", {}).get("tags", []), "".join(cell["source"])


@pytest.mark.slow
def test_run_all_reaches_the_last_cell_and_shows_hints(tmp_path, monkeypatch):
    path = ROOT / "notebooks" / "00-setup-and-dataset.ipynb"
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # the learner's default colours
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "Run All stopped before the last cell"
    graded = [c for c in code if graded_ids(c.source)]
    for cell in graded:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert len(errors) == 1 and errors[0].ename == "AssertionError"
        shown = "\n".join(errors[0].traceback)
        assert "✗ 00.q" in shown and ("No answer yet" in shown or "Not written yet" in shown)
        assert "bank.py" not in shown and "Traceback" not in shown
    others = [c for c in code if not graded_ids(c.source)]
    assert not [o for c in others for o in c.outputs if o.output_type == "error"]


MASTERS = sorted((ROOT / "solutions").glob("*.ipynb"))


@pytest.mark.parametrize("path", MASTERS, ids=lambda p: p.name)
def test_every_check_of_a_master_is_stored_as_right(path):
    """With strict nbval (which reruns each master and compares every output with the stored
    one), this proves a master scores N/N without running it a second time: `make test` grades
    the masters from the execution nbval already made."""
    from perfcourse.grading.bank import RIGHT_MARK

    nb = nbformat.read(str(path), as_version=4)
    checked = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        assert not {"nbval-ignore-output", "nbval-skip", RAISES_TAG} & set(tags) or not graded_ids(cell.source), (
            f"{path.name} cell {index}: a graded cell must have its output compared")
        printed = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        for qid in graded_ids(cell.source):
            assert not errors and f"{RIGHT_MARK} {qid} right" in printed, (
                f"{path.name} cell {index}: {qid} is not stored as right; run `make outputs`")
            checked += 1
    assert checked, f"{path.name} has no graded cell"
