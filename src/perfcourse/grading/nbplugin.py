"""pytest plugin used by ``perfcourse grade``: records what every notebook cell did.

Loaded with ``-p perfcourse.grading.nbplugin`` next to nbval. For each nbval cell item it records
the outcome, the question ids the cell checks (``check("NN.qK", ...)`` calls), the error name
and message when the cell raised (an ``AssertionError`` message is the learner's hint) and the
cell's stdout (the confirmations of passed checks). At the end of the session it writes a JSON
report to the file named by ``PERFCOURSE_GRADE_REPORT``; ``perfcourse.grading.runner`` reads it.

Not xdist-safe (one report file per session): grading runs serially.
"""

from __future__ import annotations

import json
import os

import pytest

from .bank import graded_ids

__all__ = [
    "REPORT_ENV",
    "pytest_collectreport",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
]

REPORT_ENV = "PERFCOURSE_GRADE_REPORT"

_records: dict[str, dict] = {}
_errors: list[dict] = []


def _is_cell(item) -> bool:
    try:
        from nbval.plugin import IPyNbCell  # noqa: PLC0415 - nbval registers itself when pytest loads it
    except ImportError:  # pragma: no cover - nbval is a dependency of grading
        return False
    return isinstance(item, IPyNbCell)


def _cell_outputs(item) -> tuple[str, dict | None]:
    stdout, error = [], None
    for out in getattr(item, "test_outputs", None) or []:
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            stdout.append(out.get("text", ""))
        elif out.get("output_type") == "error":
            error = {"ename": out.get("ename", ""), "evalue": out.get("evalue", "")}
    return "".join(stdout), error


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.lstrip().startswith("# NBVAL"):
            line = line.strip()
            return line if len(line) <= 60 else line[:57] + "..."
    return ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not _is_cell(item):
        return
    report = outcome.get_result()
    record = _records.setdefault(item.nodeid, {
        "notebook": str(item.path),
        "cell": item.cell_num,
        "qids": graded_ids(item.cell.source),
        "first_line": _first_line(item.cell.source),
        "outcome": "passed",
        "ename": None,
        "evalue": None,
        "message": None,
        "stdout": "",
    })
    if call.when == "call":
        record["stdout"], error = _cell_outputs(item)
        if error:
            record["ename"], record["evalue"] = error["ename"], error["evalue"]
            if record["qids"]:
                # A graded cell tagged raises-exception passes under nbval even when its check
                # failed: the error it showed is what counts.
                record["outcome"] = "failed"
    if report.skipped and record["outcome"] == "passed":
        record["outcome"] = "skipped"
    elif report.failed:
        record["outcome"] = "failed"
        if record["message"] is None and call.excinfo is not None:
            # nbval's own messages (timeouts, dead kernel) when the cell produced no error output
            lines = str(call.excinfo.value).strip().splitlines()
            record["message"] = f"{call.when}: {lines[0] if lines else call.excinfo.typename}"


def pytest_collectreport(report):
    if report.failed:
        _errors.append({"nodeid": report.nodeid, "message": str(report.longrepr)[-2000:]})


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    payload = {
        "exitstatus": int(exitstatus),
        "cells": sorted(_records.values(), key=lambda r: (r["notebook"], r["cell"])),
        "collect_errors": _errors,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
