"""Faults a learner meets: an unreachable server, two seeds at once, a damaged dataset file.

Every test works in a data folder of its own (``PERFCOURSE_DATA`` = ``tmp_path``), so the
course's ``data/`` is never touched; PostgreSQL tests use a namespace of their own and drop it.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import types

import psycopg
import pytest
import redis
import sqlalchemy as sa

from perfcourse import cli, db
from perfcourse import seed as seed_module
from perfcourse.config import DATASET_SEED, SCHEMA_VERSION, get_scale
from perfcourse.seed import expected_rows, read_manifest, row_counts, seed_dataset
from tests.conftest import unique_namespace, use_postgres

UNREACHABLE_DATABASE_URL = "postgresql://127.0.0.1:1/nothing"
UNREACHABLE_REDIS_URL = "redis://127.0.0.1:1/0"


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A fresh, private data folder (``PERFCOURSE_DATA``) for the test and its subprocesses."""
    monkeypatch.setenv("PERFCOURSE_DATA", str(tmp_path))
    return tmp_path


def _error_line(err: str) -> str:
    """The one ``error:`` line of a failed command (nothing else, no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def _assert_complete_tiny(eng) -> dict:
    """The tiny dataset behind ``eng`` is complete: manifest current, rows as it says."""
    manifest = read_manifest(eng)
    assert manifest is not None
    assert manifest["scale"] == "tiny" and manifest["seed"] == DATASET_SEED
    assert manifest["schema_version"] == SCHEMA_VERSION
    counts = row_counts(eng)
    assert counts == manifest["counts"]
    assert counts["orders"] == 1_000 and counts["users"] == 200
    total, estimate = sum(counts.values()), expected_rows(get_scale("tiny"))
    assert abs(total - estimate) < 0.05 * total
    return manifest


# ------------------------------------------------------------------------------------------------
# 1. An unreachable server: one sentence with the fix, never a traceback
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["seed", "--backend", "postgres", "--scale", "tiny"],
        ["drop", "--backend", "postgres", "--scale", "tiny"],
        ["export", "--backend", "postgres", "--scale", "tiny"],
        ["services", "up"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_unreachable_postgres_is_one_sentence_with_the_fix(command, data, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_DATABASE_URL)
    monkeypatch.setenv("REDIS_URL", UNREACHABLE_REDIS_URL)
    assert cli.main(command) != 0
    out, err = capsys.readouterr()
    line = _error_line(err)
    assert "127.0.0.1:1" in line and "DATABASE_URL" in line
    assert out == ""
    assert sorted(p.name for p in data.iterdir()) == []  # nothing started, nothing half-done


def test_unreachable_postgres_from_the_shell(data):
    env = {**os.environ, "DATABASE_URL": UNREACHABLE_DATABASE_URL}
    result = subprocess.run(
        [sys.executable, "-m", "perfcourse", "seed", "--backend", "postgres", "--scale", "tiny"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode != 0
    line = _error_line(result.stderr)
    assert "Check DATABASE_URL" in line and "perfcourse doctor" in line
    assert result.stdout == ""


def test_unreachable_redis_is_one_sentence_with_the_fix(data, monkeypatch, capsys):
    use_postgres("configured", monkeypatch)  # skipped when no PostgreSQL listens there
    monkeypatch.setenv("REDIS_URL", UNREACHABLE_REDIS_URL)
    assert cli.main(["services", "up"]) != 0
    line = _error_line(capsys.readouterr().err)
    assert "REDIS_URL" in line


def _psycopg_error(message: str) -> sa.exc.OperationalError:
    """What SQLAlchemy raises when the PostgreSQL server goes away in the middle of a command."""
    return sa.exc.OperationalError("COPY order_items", {}, psycopg.OperationalError(message))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_psycopg_error("server closed the connection unexpectedly\n\tThis probably means..."),
         ["PostgreSQL failed: server closed the connection unexpectedly", "DATABASE_URL",
          "`perfcourse services down`"]),
        (psycopg.OperationalError("consuming input failed: EOF detected"),
         ["PostgreSQL failed: consuming input failed", "DATABASE_URL"]),
        (redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
         ["Redis failed: Error 111", "REDIS_URL", "`perfcourse services down`"]),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
         ["A server did not answer", "DATABASE_URL", "REDIS_URL", "`perfcourse services down`"]),
        (sqlite3.OperationalError("database or disk is full"),
         ["SQLite failed: database or disk is full", "PERFCOURSE_DATA"]),
        (OSError(errno.ENOSPC, "No space left on device", "/data/parquet/orders.parquet.tmp"),
         ["The disk is full", "orders.parquet.tmp", "PERFCOURSE_DATA"]),
    ],
    ids=["sqlalchemy-psycopg", "psycopg", "redis", "connection-refused", "sqlite-full", "disk-full"],
)
def test_backend_failure_midway_is_one_sentence(error, expected, monkeypatch, capsys):
    """A server or disk failing after the connection check, in a delegated command too."""

    def fail(*_args, **_kwargs):
        raise error

    command = types.ModuleType("perfcourse_test_failing_command")
    command.main = fail
    monkeypatch.setitem(sys.modules, command.__name__, command)
    monkeypatch.setitem(cli.DELEGATED, "bench", (command.__name__, "main", "fails"))
    assert cli.main(["bench", "--scale", "tiny"]) == 2
    line = _error_line(capsys.readouterr().err)
    for text in expected:
        assert text in line


def test_backend_failure_during_seed_is_one_sentence(data, monkeypatch, capsys):
    def fail(*_args, **_kwargs):
        raise _psycopg_error("terminating connection due to administrator command")

    monkeypatch.setattr(seed_module, "seed_dataset", fail)
    assert cli.main(["seed", "--scale", "tiny"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "terminating connection" in line and "DATABASE_URL" in line


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only backend errors become one line: anything else is a bug worth its traceback."""

    def fail(*_args, **_kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(seed_module, "seed_dataset", fail)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["seed", "--scale", "tiny"])


# ------------------------------------------------------------------------------------------------
# 2. Seeds at once: they take turns, all succeed, the dataset is built once
# ------------------------------------------------------------------------------------------------

# Imports first, then "ready", then the start signal on stdin: every process starts seeding at
# the same moment instead of whenever its interpreter happens to finish starting. A line on
# stdout marks each real build, so the test can count them.
RACE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from perfcourse import cli, db, seed

    for name in ("_load_sqlite", "_load_postgres"):
        def counted(*args, _load=getattr(seed, name), **kwargs):
            print("race: built", flush=True)
            return _load(*args, **kwargs)
        setattr(seed, name, counted)

    print("race: ready", flush=True)
    sys.stdin.readline()
    if sys.argv[1] == "cli":
        sys.exit(cli.main(sys.argv[2:]))
    backend, namespace = sys.argv[1:3]
    counts = seed.seed_dataset(db.engine(backend, namespace=namespace), "tiny", progress=False)
    print("race: counts " + json.dumps(counts), flush=True)
    """
)


def _race(argv: list[str], processes: int = 3) -> list[tuple[int, str, str]]:
    """Run RACE_SCRIPT ``processes`` times at once; (status, stdout, stderr) of each."""
    running = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, *argv], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        )
        for _ in range(processes)
    ]
    try:
        for process in running:
            assert process.stdout.readline() == "race: ready\n", process.stderr.read()
        for process in running:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = []
        for process in running:
            out, err = process.communicate(timeout=120)
            results.append((process.returncode, out, err))
        return results
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_concurrent_cli_seeds_wait_for_each_other(data):
    results = _race(["cli", "seed", "--scale", "tiny"])
    for status, out, err in results:
        assert status == 0, err
        assert "Traceback" not in err
        assert "sqlite tiny:" in out and "orders 1,000" in out
    assert sum(out.count("race: built") for _, out, _ in results) == 1
    eng = db.engine("sqlite", scale="tiny")
    try:
        _assert_complete_tiny(eng)
    finally:
        eng.dispose()
    assert not list(data.glob("*.loading"))


def test_concurrent_cli_seeds_rebuild_a_stale_dataset_once(data):
    """Processes that read the old dataset first still see the new one after waiting."""
    eng = db.engine("sqlite", scale="tiny")
    seed_dataset(eng, "tiny", seed=99, progress=False)  # another seed: stale for the course
    eng.dispose()
    results = _race(["cli", "seed", "--scale", "tiny"])
    for status, _, err in results:
        assert status == 0, err
    assert sum(out.count("race: built") for _, out, _ in results) == 1
    try:
        _assert_complete_tiny(eng)
    finally:
        eng.dispose()


def test_a_seed_waits_while_another_process_holds_the_dataset(data):
    """The lock is held across processes: the load starts only once it is released."""
    eng = db.engine("sqlite", scale="tiny")
    with seed_module._dataset_lock(eng):
        process = subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, "sqlite", "shop_tiny"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        )
        try:
            assert process.stdout.readline() == "race: ready\n"
            process.stdin.write("go\n")
            process.stdin.flush()
            time.sleep(1.0)  # a tiny load takes a fraction of that
            assert process.poll() is None
            assert not db.sqlite_path("shop_tiny").exists()
            assert not list(data.glob("*.loading"))
        except BaseException:
            process.kill()
            process.wait()
            raise
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "race: built" in out
    _assert_complete_tiny(eng)
    eng.dispose()


@pytest.mark.postgres
def test_concurrent_postgres_seeds_wait_for_each_other(data, monkeypatch):
    use_postgres("configured", monkeypatch)  # skipped when no PostgreSQL listens there
    namespace = unique_namespace("race")
    try:
        results = _race(["postgres", namespace])
        counts = []
        for status, out, err in results:
            assert status == 0, err
            assert "Traceback" not in err
            counts += [json.loads(line.split(" ", 2)[2]) for line in out.splitlines()
                       if line.startswith("race: counts ")]
        assert sum(out.count("race: built") for _, out, _ in results) == 1
        eng = db.engine("postgres", namespace=namespace)
        try:
            manifest = _assert_complete_tiny(eng)
        finally:
            eng.dispose()
        assert counts == [manifest["counts"]] * len(results)
    finally:
        db.drop_namespace("postgres", namespace)


# ------------------------------------------------------------------------------------------------
# 3. A damaged SQLite file: kept aside, said once, rebuilt
# ------------------------------------------------------------------------------------------------


def _garbage(path):
    path.write_bytes(os.urandom(4096))


def _truncated(path):
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {"garbage": _garbage, "truncated": _truncated}


@pytest.fixture
def damaged(data):
    """The tiny dataset seeded into the private data folder, then damaged by the test."""
    eng = db.engine("sqlite", scale="tiny")
    seed_dataset(eng, "tiny", progress=False)
    eng.dispose()
    # Neighbours that must come through untouched.
    (data / "notes.txt").write_text("keep me\n")
    (data / "shop_small.sqlite").write_bytes(b"another dataset")
    yield eng
    eng.dispose()


def _others(folder) -> dict:
    return {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in folder.iterdir()
        if path.name in ("notes.txt", "shop_small.sqlite")
    }


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_dataset_is_kept_aside_and_rebuilt(damage, damaged, data, capsys):
    path = db.sqlite_path("shop_tiny")
    DAMAGE[damage](path)
    if damage == "garbage":  # journal files left beside it go with it
        path.with_name(path.name + "-wal").write_bytes(b"wal bytes")
        path.with_name(path.name + "-shm").write_bytes(b"shm bytes")
    damaged_bytes = path.read_bytes()
    others = _others(data)
    capsys.readouterr()

    counts = seed_dataset(damaged, "tiny", progress=False)

    assert counts == _assert_complete_tiny(damaged)["counts"]
    kept = list(data.glob("shop_tiny.sqlite.damaged-*"))
    kept_file = [p for p in kept if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept_file) == 1
    assert kept_file[0].read_bytes() == damaged_bytes
    if damage == "garbage":
        assert (data / (kept_file[0].name + "-wal")).read_bytes() == b"wal bytes"
        assert (data / (kept_file[0].name + "-shm")).read_bytes() == b"shm bytes"
    assert _others(data) == others
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and kept_file[0].name in warnings[0]
    # rebuilt once: the next seed finds it up to date and says nothing
    manifest = read_manifest(damaged)
    seed_dataset(damaged, "tiny", progress=False)
    assert read_manifest(damaged) == manifest
    assert "damaged" not in capsys.readouterr().err


def test_looking_at_a_damaged_dataset_changes_nothing(damaged, data):
    path = db.sqlite_path("shop_tiny")
    _garbage(path)
    before = sorted(p.name for p in data.iterdir())
    assert read_manifest(damaged) is None
    assert sorted(p.name for p in data.iterdir()) == before


def test_cli_seed_rebuilds_a_damaged_dataset(damaged, data, capsys):
    _garbage(db.sqlite_path("shop_tiny"))
    others = _others(data)
    capsys.readouterr()
    assert cli.main(["seed", "--scale", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "sqlite tiny: loaded in" in out and "orders 1,000" in out
    (kept,) = data.glob("shop_tiny.sqlite.damaged-*")
    assert kept.stat().st_size == 4096
    assert [line for line in err.splitlines() if "damaged" in line] == [
        line for line in err.splitlines() if kept.name in line
    ]
    _assert_complete_tiny(damaged)
    assert _others(data) == others


def test_cli_seed_rebuilds_a_damaged_dataset_from_the_shell(damaged, data):
    _garbage(db.sqlite_path("shop_tiny"))
    result = subprocess.run(
        [sys.executable, "-m", "perfcourse", "seed", "--scale", "tiny"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "was damaged (file is not a database)" in result.stderr
    assert len(list(data.glob("shop_tiny.sqlite.damaged-*"))) == 1
    _assert_complete_tiny(damaged)
