"""`make bench`: the course's performance budgets, measured.

Seeding speed against the raw driver bulk path, measured side by side.

For each backend, the same rows are written twice into fresh namespaces:
1. raw: rows generated beforehand, then only the driver's bulk path (SQLite ``executemany`` in one
   transaction; PostgreSQL ``COPY``), no indexes, no manifest;
2. seed: :func:`perfcourse.seed.seed_dataset` end to end (generation, load, indexes, ANALYZE,
   manifest, swap).
The printed ratio is seed rate / raw rate (goal: at least 0.5). Best of ``--repeat`` runs each.

Notebook budgets (``--notebooks``): every master in ``solutions/`` executed top to bottom in a
fresh kernel, with its wall time (goal: under 60 s) and the kernel's peak resident memory (goal:
under 1 GB, what Binder guarantees).
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import nbformat
import sqlalchemy as sa
from nbclient import NotebookClient

from . import db
from .config import get_scale
from .seed import _ddl, generate, seed_dataset

__all__ = [
    "BENCH_NAMESPACE",
    "NOTEBOOK_BYTES",
    "NOTEBOOK_SECONDS",
    "RAW_NAMESPACE",
    "execute_notebook",
    "main",
    "print_notebooks",
    "run",
    "run_notebooks",
]

BENCH_NAMESPACE = "bench_seed"
RAW_NAMESPACE = "bench_raw"


def _raw_sqlite(chunks) -> float:
    path = db.sqlite_path(RAW_NAMESPACE)
    db.drop_namespace("sqlite", RAW_NAMESPACE)
    tables, _ = _ddl(sa.create_engine("sqlite://").dialect)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for statement in tables:
            conn.execute(statement)
        started = time.perf_counter()
        conn.execute("BEGIN")
        for chunk in chunks:
            marks = ", ".join("?" * len(chunk.columns))
            conn.executemany(f"INSERT INTO {chunk.table} VALUES ({marks})", chunk.rows())
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
    db.drop_namespace("sqlite", RAW_NAMESPACE)
    return elapsed


def _raw_postgres(chunks) -> float:
    eng = db.engine("postgres", namespace=RAW_NAMESPACE)
    tables, _ = _ddl(eng.dialect)
    try:
        with eng.connect() as conn:
            conn.execute(sa.text(f"drop schema if exists {RAW_NAMESPACE} cascade"))
            conn.execute(sa.text(f"create schema {RAW_NAMESPACE}"))
            for statement in tables:
                conn.execute(sa.text(statement))
            conn.commit()
            raw = conn.connection.driver_connection
            started = time.perf_counter()
            with raw.cursor() as cursor:
                for chunk in chunks:
                    with cursor.copy(f"COPY {chunk.table} FROM STDIN") as copy:
                        for row in chunk.rows():
                            copy.write_row(row)
            raw.commit()
            return time.perf_counter() - started
    finally:
        eng.dispose()
        db.drop_namespace("postgres", RAW_NAMESPACE)


def _seed(backend: str, scale: str) -> float:
    eng = db.engine(backend, namespace=BENCH_NAMESPACE)
    try:
        started = time.perf_counter()
        seed_dataset(eng, scale, force=True, progress=False)
        return time.perf_counter() - started
    finally:
        eng.dispose()
        db.drop_namespace(backend, BENCH_NAMESPACE)


def run(scale: str = "small", repeat: int = 3, backends=("sqlite", "postgres")) -> list[dict]:
    chunks = list(generate(get_scale(scale)))
    rows = sum(len(c) for c in chunks)
    raw_path = {"sqlite": _raw_sqlite, "postgres": _raw_postgres}
    results = []
    for backend in backends:
        raw = min(raw_path[backend](chunks) for _ in range(repeat))
        seeded = min(_seed(backend, scale) for _ in range(repeat))
        results.append({
            "backend": backend, "rows": rows, "raw_s": raw, "seed_s": seeded,
            "raw_rows_per_s": rows / raw, "seed_rows_per_s": rows / seeded, "ratio": raw / seeded,
        })
    return results


NOTEBOOK_SECONDS = 60
NOTEBOOK_BYTES = 1024**3


def execute_notebook(path: Path) -> dict:
    """Run one notebook in a fresh kernel (in this process); time it and read the kernel's peak RSS.

    Call it in a process of its own: ``ru_maxrss`` of RUSAGE_CHILDREN is the largest child this
    process has waited for, here the kernel.
    """

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"notebook": str(path), "seconds": seconds, "peak_bytes": peak_kib * 1024}


def run_notebooks(paths: list[Path]) -> list[dict]:
    results = []
    for path in paths:
        output = subprocess.run(
            [sys.executable, "-m", "perfcourse.bench", "--execute-one", str(path)],
            capture_output=True, text=True, check=False,
        )
        if output.returncode != 0:
            tail = (output.stderr.strip().splitlines() or ["(no output)"])[-1]
            results.append({"notebook": str(path), "error": tail})
        else:
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    return results


def print_notebooks(results: list[dict]) -> bool:
    print(f"notebook budgets: under {NOTEBOOK_SECONDS} s and {NOTEBOOK_BYTES / 1024**3:.0f} GB each")
    ok = True
    for r in results:
        if "error" in r:
            ok = False
            print(f"  {r['notebook']:<55} FAILED: {r['error']}")
            continue
        fits = r["seconds"] < NOTEBOOK_SECONDS and r["peak_bytes"] < NOTEBOOK_BYTES
        ok &= fits
        print(
            f"  {r['notebook']:<55} {r['seconds']:6.1f} s  {r['peak_bytes'] / 1024**2:6.0f} MB  "
            f"{'ok' if fits else 'OVER BUDGET'}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perfcourse bench", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", action="append", choices=db.BACKENDS)
    parser.add_argument("--notebooks", nargs="*", type=Path, metavar="NOTEBOOK",
                        help="also run notebooks (default with no names: every master in solutions/)")
    parser.add_argument("--no-seeding", action="store_true", help="skip the seeding benchmark")
    parser.add_argument("--execute-one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.execute_one:
        print(json.dumps(execute_notebook(args.execute_one)))
        return 0
    ok = True
    if args.notebooks is not None:
        paths = args.notebooks or sorted(Path("solutions").glob("*.ipynb"))
        ok = print_notebooks(run_notebooks(paths))
    if args.no_seeding:
        return 0 if ok else 1
    results = run(args.scale, args.repeat, tuple(args.backend or db.BACKENDS))
    print(f"seeding benchmark, scale {args.scale}, best of {args.repeat}")
    print(f"{'backend':<9} {'rows':>9} {'raw bulk':>10} {'seed_dataset':>13} {'ratio':>7}  goal")
    for r in results:
        verdict = "ok" if r["ratio"] >= 0.5 else "BELOW GOAL"
        print(
            f"{r['backend']:<9} {r['rows']:>9,} {r['raw_s']:>9.2f}s {r['seed_s']:>12.2f}s "
            f"{r['ratio']:>6.2f}x  >=0.5 {verdict}"
        )
        print(
            f"          {r['raw_rows_per_s']:>9,.0f} rows/s raw, {r['seed_rows_per_s']:,.0f} rows/s "
            f"seed_dataset ({args.scale} seeded in {r['seed_s']:.2f}s)"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
