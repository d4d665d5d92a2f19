"""Engines, embedded and configured servers, readable failures, the doctor and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from perfcourse import db, services
from perfcourse.doctor import render, run_checks
from perfcourse.errors import BackendUnavailable


def test_engine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sqlite' or 'postgres"):
        db.engine("mysql")
    with pytest.raises(ValueError, match="tiny, small, large"):
        db.engine("sqlite", scale="huge")
    with pytest.raises(ValueError, match="lower-case"):
        db.engine("sqlite", namespace="Robert'); drop table")


def test_postgres_namespace_is_a_schema(postgres_engine):
    with postgres_engine.begin() as conn:
        conn.execute(sa.text("create table t (x int)"))
        schema = conn.execute(
            sa.text("select table_schema from information_schema.tables where table_name='t'")
        ).scalar()
    assert schema == db.namespace_of(postgres_engine)


def test_embedded_postgres_is_shared_by_processes(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = services.postgres_url()
    other = subprocess.run(
        [sys.executable, "-c", "from perfcourse import services; print(services.postgres_url())"],
        capture_output=True, text=True, check=True, env={**os.environ},
    ).stdout.strip()
    assert other == url
    assert "host=/" in url  # a unix socket, not a TCP port


def test_configured_database_url_is_used(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://someone@db.invalid:5432/shop")
    assert services.postgres_url() == "postgresql+psycopg://someone@db.invalid:5432/shop"


def test_unreachable_postgres_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:9/nowhere")
    with pytest.raises(BackendUnavailable) as error:
        db.check_connection(db.engine("postgres"))
    message = str(error.value)
    assert "Cannot connect" in message and "DATABASE_URL" in message
    assert "Traceback" not in message and "\n" not in message


def test_redis_client_both_ways(redis_client):
    key = redis_client.prefix + "counter"
    assert redis_client.incr(key) == 1
    assert redis_client.incr(key) == 2


def test_embedded_redis_is_shared_by_processes(monkeypatch, tmp_path):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PERFCOURSE_DATA", str(tmp_path))  # a server of this test's own
    try:
        url = services.redis_url()
        assert url.startswith("unix://")
        other = subprocess.run(
            [sys.executable, "-c", "from perfcourse import services; print(services.redis_url())"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        assert other == url
    finally:
        services.stop_embedded_redis()


def test_unreachable_redis_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    with pytest.raises(BackendUnavailable, match="does not answer.*REDIS_URL"):
        services.redis_client()


def test_doctor_all_good_with_embedded_servers(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    checks = {c.name: c for c in run_checks()}
    assert checks["PostgreSQL, embedded"].ok, checks["PostgreSQL, embedded"].detail
    assert checks["Redis, embedded"].ok, checks["Redis, embedded"].detail
    assert all(checks[name].ok for name in checks if name.startswith("package")), render(list(checks.values()))


def test_doctor_reports_a_missing_backend_with_its_fix():
    env = {**os.environ, "DATABASE_URL": "postgresql://127.0.0.1:9/nowhere",
           "REDIS_URL": "redis://127.0.0.1:9/0"}
    result = subprocess.run(
        [sys.executable, "-m", "perfcourse", "doctor"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1
    assert "✗ PostgreSQL, configured (DATABASE_URL)" in result.stdout
    assert "✗ Redis, configured (REDIS_URL)" in result.stdout
    assert "fix: Start that server or unset DATABASE_URL" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_seed_reports_up_to_date(tmp_path):
    env = {**os.environ, "PERFCOURSE_DATA": str(tmp_path)}
    command = [sys.executable, "-m", "perfcourse", "seed", "--scale", "tiny"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    second = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert "loaded in" in first.stdout and "orders 1,000" in first.stdout
    assert "already up to date" in second.stdout


def test_cli_bad_scale_is_a_message_not_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "perfcourse", "seed", "--scale", "huge"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "use one of tiny, small, large" in result.stderr


def test_concurrent_starts_share_one_embedded_redis(tmp_path):
    """Four processes asking at once for the embedded Redis get the same server."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PERFCOURSE_DATA"] = str(tmp_path)
    code = "from perfcourse import services; print(services.redis_url())"
    processes = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    urls = {p.communicate(timeout=60)[0].strip() for p in processes}
    try:
        assert len(urls) == 1
    finally:
        subprocess.run([sys.executable, "-m", "perfcourse", "services", "down"], env=env, check=True)
    servers = subprocess.run(["pgrep", "-f", f"{tmp_path}"], capture_output=True, text=True).stdout
    assert servers.strip() == ""


def test_cli_drop_removes_a_dataset(tmp_path):
    env = {**os.environ, "PERFCOURSE_DATA": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "perfcourse", "seed", "--scale", "tiny"], env=env,
                   check=True, capture_output=True)
    assert (tmp_path / "shop_tiny.sqlite").is_file()
    result = subprocess.run([sys.executable, "-m", "perfcourse", "drop", "--scale", "tiny"],
                            env=env, check=True, capture_output=True, text=True)
    assert "dropped shop_tiny" in result.stdout
    assert not (tmp_path / "shop_tiny.sqlite").exists()


def test_embedded_redis_is_reachable_by_its_owner_only(tmp_path, monkeypatch):
    """A workshop server has many accounts: the embedded Redis listens on no TCP port, only on
    a unix socket inside a folder that only the learner may enter."""
    import stat

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PERFCOURSE_DATA", str(tmp_path))
    try:
        client = services.redis_client()
        assert client.config_get("port")["port"] == "0"
        sock = Path(client.connection_pool.connection_kwargs["path"])
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
        assert client.ping()
        client.close()
    finally:
        services.stop_embedded_redis()
