"""The set-up files stay true: Makefile targets, environment.yml pins, Binder's postBuild."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


CONDA_TO_PIP = {"redis-py": "redis", "matplotlib-base": "matplotlib", "memory_profiler": "memory-profiler"}


def test_environment_yml_pins_the_same_minor_versions_as_the_lock():
    lock = _lock()
    pinned = re.findall(r"^  - ([A-Za-z0-9_.-]+)=([0-9.]+)\s", (ROOT / "environment.yml").read_text(), re.M)
    assert len(pinned) > 15
    for conda_name, version in pinned:
        pip_name = CONDA_TO_PIP.get(conda_name, conda_name)
        if pip_name == "python":
            continue
        assert pip_name in lock, f"{conda_name} is in environment.yml but not in requirements.lock"
        assert lock[pip_name].startswith(version + "."), (
            f"{conda_name}: environment.yml pins {version}, requirements.lock has {lock[pip_name]}"
        )


def test_every_dependency_is_pinned_in_the_lock():
    lock = _lock()
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'^\s+"([A-Za-z0-9_.-]+)(?:\[[a-z]+\])?[<>=]', pyproject, re.M)
    missing = [d for d in deps if d.lower().replace("_", "-") not in lock]
    assert not missing, f"not pinned in requirements.lock: {missing} (run `make lock`)"


def test_make_alone_lists_the_targets():
    result = subprocess.run(["make", "-s", "-C", str(ROOT)], capture_output=True, text=True, check=True)
    for target in ("lab", "test", "setup", "bench", "grade", "assign", "outputs", "clean", "doctor"):
        assert f"make {target} " in result.stdout


def test_the_notebook_lanes_run_every_notebook_once():
    """`make test-notebooks` runs the notebooks in lanes of chapters: a chapter left out of every
    lane would go untested, one in two lanes would run beside itself."""
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), "test-notebooks", f"STAMP={ROOT / 'pyproject.toml'}"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    nbval = [line for line in dry if " --nbval " in line]
    grade = [line for line in dry if "--expect-untouched" in line]
    assert len(nbval) == len(grade) >= 2, dry
    ran = {"solutions": re.findall(r"solutions/(\S+\.ipynb)", " ".join(nbval))}
    for folder in ("notebooks", "labs"):
        ran[folder] = re.findall(rf"{folder}/(\S+\.ipynb)", " ".join(grade))
    for folder, names in ran.items():
        assert sorted(names) == sorted(p.name for p in (ROOT / folder).glob("*.ipynb")), folder


def test_lab_listens_on_loopback_with_token_by_default():
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "lab", f"STAMP={ROOT / 'pyproject.toml'}"],
        capture_output=True, text=True, check=True,
    )
    command = next(line for line in result.stdout.splitlines() if "jupyter lab" in line)
    assert "--ServerApp.ip=127.0.0.1" in command
    assert "token" not in command.lower()  # Jupyter's token auth stays at its default: on


@pytest.mark.slow
def test_lab_command_serves_jupyterlab_behind_a_token(tmp_path):
    """Run the very command `make lab` runs (with this environment's jupyter) and knock."""
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dry = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "lab", f"STAMP={ROOT / 'pyproject.toml'}", f"LAB_PORT={port}"],
        capture_output=True, text=True, check=True,
    ).stdout
    logical_lines = dry.replace("\\\n", " ").splitlines()
    command = next(line for line in logical_lines if "jupyter lab" in line).split()
    command[0] = str(Path(sys.executable).parent / "jupyter")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "BROWSER": "true"}
    server = subprocess.Popen(command + ["--no-browser"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        token, deadline = None, time.monotonic() + 60
        while token is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            match = re.search(rf"http://127\.0\.0\.1:{port}/\S*token=([0-9a-f]+)", line)
            token = match.group(1) if match else None
        assert token, "JupyterLab did not print a URL with a token on 127.0.0.1"
        api = f"http://127.0.0.1:{port}/api/contents/notebooks"
        refused = None
        while refused is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(api, timeout=10)
                pytest.fail("JupyterLab answered without a token")
            except urllib.error.HTTPError as error:
                refused = error
            except urllib.error.URLError:  # the URL is printed a moment before it listens
                time.sleep(0.2)
        assert refused is not None and refused.code == 403
        with urllib.request.urlopen(f"{api}?token={token}", timeout=10) as answer:
            assert answer.status == 200
        # no "news" prompt over the first notebook: the overrides `make setup` installs
        settings = (f"http://127.0.0.1:{port}/lab/api/settings/"
                    f"@jupyterlab/apputils-extension:notification?token={token}")
        with urllib.request.urlopen(settings, timeout=10) as answer:
            defaults = json.loads(answer.read())["schema"]["properties"]  # overrides set defaults
        assert defaults["fetchNews"]["default"] == "false"
        assert defaults["checkForUpdates"]["default"] is False
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_readme_maps_the_guide_as_chapter_00_does():
    import nbformat

    cells = nbformat.read(str(ROOT / "solutions" / "00-setup-and-dataset.ipynb"), as_version=4).cells
    section = next(c.source for c in cells if c.source.startswith("## From the guide's names to ours"))
    table = [line for line in section.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(table) > 10 and all(line in readme for line in table)


def test_chapter_00_and_the_readme_link_every_lesson_and_lab_in_order():
    import nbformat

    cells = nbformat.read(str(ROOT / "solutions" / "00-setup-and-dataset.ipynb"), as_version=4).cells
    course_map = next(c.source for c in cells if c.source.startswith("## The course, in order"))
    readme = (ROOT / "README.md").read_text()
    learner = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb"))
    for path in learner:
        relative = f"{path.parent.name}/{path.name}"
        assert f"(../{relative})" in course_map, f"chapter 00 does not link {relative}"
        assert f"({relative})" in readme, f"the README does not link {relative}"
    lessons = [line for line in course_map.splitlines() if line.startswith("| [")]
    assert lessons == sorted(lessons), "chapter 00 lists the lessons out of order"


def test_the_instructor_guide_schedules_add_up_to_the_notebooks_minutes():
    import nbformat

    guide = (ROOT / "docs" / "instructor-guide.md").read_text()
    tables = re.split(r"\n\n(?=\| notebook \|)", guide)[1:]
    assert len(tables) == 4, "two days, a third day and one day"
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
        total = 0
        for row in rows:
            name = re.search(r"\(`([^`]+)`\)", row).group(1)
            teaching, exercises = (int(m) for m in re.findall(r"\| (\d+) min", row)[:2])
            first = nbformat.read(str(ROOT / "solutions" / f"{name}.ipynb"), as_version=4).cells[0].source
            declared_teaching = re.search(r"\*\*Teaching:\*\* (\d+) min", first)
            declared_exercises = re.search(r"\*\*Exercises:\*\* (\d+) min", first)
            assert teaching == (int(declared_teaching.group(1)) if declared_teaching else 0), name
            assert exercises == int(declared_exercises.group(1)), name
            total += teaching + exercises
        day = re.search(r"\*\*day total\*\* \| \*\*\d+ min\*\* \| \*\*\d+ min\*\* \| \*\*(\d+) min", table)
        assert int(day.group(1)) == total
