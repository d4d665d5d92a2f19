"""Binder, replayed: what repo2docker does with ``binder/``, then a learner's first hour on it.

repo2docker installs ``binder/requirements.txt`` into a fresh environment and runs
``binder/postBuild``; Binder then starts JupyterLab in a container with 1-2 GB of memory and no
services. This suite does the same in a fresh virtual environment with a data directory of its
own, starts JupyterLab from that environment, runs the learner versions of chapters 00, 02 and 05
in it one after another (each in a fresh kernel, as a learner who closes one before opening the
next), and samples the memory of every process of that session together: the Jupyter server, the
kernel, and the embedded PostgreSQL and Redis the kernel starts. The peak must stay under 1 GB,
Binder's guarantee; it is written to ``data/binder-replay.json`` and quoted in the README.

Run with ``make binder`` (CI runs it after ``make test``): it installs every pinned package into
a new environment, a few minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from perfcourse.memory import Footprint
from perfcourse.services import session_processes
from perfcourse.units import format_bytes

ROOT = Path(__file__).resolve().parents[2]
BINDER_BYTES = 1024**3  # what Binder guarantees a session
NOTEBOOKS = [
    "notebooks/00-setup-and-dataset.ipynb",
    "notebooks/02-query-optimization.ipynb",
    "notebooks/05-caching.ipynb",
]

# Run by the replayed environment's Python: each notebook in a fresh kernel of that environment.
DRIVER = """
import sys, time, nbformat
from nbclient import NotebookClient
for path in sys.argv[1:]:
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(__import__("pathlib").Path(path).parent)}})
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error" and o.get("ename") != "AssertionError"]
    print(f"{path}: {time.perf_counter() - started:.1f} s, errors: {[e['ename'] for e in errors]}", flush=True)
    if errors:
        sys.exit(f"{path}: {errors[0]['ename']}: {errors[0]['evalue']}")
"""


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """A fresh environment built as repo2docker builds it: requirements, then postBuild."""
    home = tmp_path_factory.mktemp("binder")
    env_dir = home / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", ROOT / "binder" / "requirements.txt"],
                   check=True, cwd=ROOT)
    env = {
        **{k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV", "PERFCOURSE_SCALE")},
        "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PERFCOURSE_DATA": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    subprocess.run(["bash", ROOT / "binder" / "postBuild"], check=True, env=env, cwd=home)
    yield {"home": home, "env_dir": env_dir, "env": env}
    subprocess.run([env_dir / "bin" / "perfcourse", "services", "down"], env=env, check=False,
                   capture_output=True)


def test_post_build_prepares_the_default_dataset_and_jupyterlab(replay):
    env_dir, env = replay["env_dir"], replay["env"]
    assert (replay["home"] / "data" / "shop_small.sqlite").is_file()
    again = subprocess.run([env_dir / "bin" / "perfcourse", "seed"], capture_output=True, text=True,
                           env=env, check=True)
    assert "already up to date" in again.stdout
    assert sys.prefix != str(env_dir)
    overrides = env_dir / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    assert overrides.read_text() == (ROOT / "binder" / "jupyterlab-overrides.json").read_text()


def test_a_learner_session_fits_in_binders_memory(replay):
    env_dir, env = replay["env_dir"], replay["env"]
    server = subprocess.Popen(
        [env_dir / "bin" / "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         "--ServerApp.port=0", f"--ServerApp.root_dir={ROOT}", "--allow-root"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)  # the server settles at its idle size before the first notebook
        assert server.poll() is None, "JupyterLab did not start in the replayed environment"
        with Footprint(session_processes(Path(env["PERFCOURSE_DATA"]))) as footprint:
            run = subprocess.run([env_dir / "bin" / "python", "-c", DRIVER, *NOTEBOOKS], env=env,
                                 cwd=ROOT, capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr[-2000:] or run.stdout[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    record = {
        "notebooks": NOTEBOOKS,
        "peak_bytes": footprint.peak_bytes,
        "peak_by_process": footprint.peak_by_process,
        "most_by_process": footprint.most_by_process,
        "samples": footprint.samples,
        "runs": run.stdout.strip().splitlines(),
    }
    (ROOT / "data" / "binder-replay.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nBinder replay: {footprint}")
    assert footprint.samples > 20, "the session was not sampled while the notebooks ran"
    seen = set(footprint.most_by_process)
    assert {"jupyter-lab", "postgres", "redis-server"} <= seen, f"the session's processes were not all seen: {seen}"
    assert footprint.peak_bytes < BINDER_BYTES, (
        f"a Binder session would need {format_bytes(footprint.peak_bytes)}, more than Binder's "
        f"{format_bytes(BINDER_BYTES)}: {footprint}"
    )
    # The README quotes the figure; keep it true (memory, not time: it moves little between runs).
    quoted = re.search(r"Binder replay.*?peaks? at ([0-9]+) MB", (ROOT / "README.md").read_text(), re.S)
    assert quoted, "the README does not quote the Binder replay's peak (`... peaks at N MB`)"
    measured_mb = footprint.peak_bytes / 1024**2
    assert abs(measured_mb - int(quoted.group(1))) <= 0.3 * measured_mb, (
        f"the README says {quoted.group(1)} MB, this run measured {measured_mb:.0f} MB: update the README"
    )
