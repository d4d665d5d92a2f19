"""The `perfcourse` command: doctor, seed, services, export, bench, and the grading pipeline."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import doctor, seed, services
from .db import check_connection, drop_namespace, engine, namespace_for
from .errors import CourseError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = [
    "DELEGATED",
    "build_parser",
    "main",
]


def _server_fix(variables: str, servers: str) -> str:
    """What to do when a server failed in the middle of a command (one sentence, after the reason)."""
    them = "them" if " and " in variables else "it"
    return (f"Check {variables} (or unset {them} to use the embedded {servers}), or restart the "
            f"embedded {servers} with `perfcourse services down`, then run the command again.")


_POSTGRES_FIX = _server_fix("DATABASE_URL", "server")
_REDIS_FIX = _server_fix("REDIS_URL", "server")
_SERVER_FIX = _server_fix("DATABASE_URL and REDIS_URL", "servers")
_UNREACHABLE = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH,
                errno.ETIMEDOUT}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def _database(backend: str, **kwargs) -> Iterator[Engine]:
    """An engine from :func:`perfcourse.db.engine`, disposed afterwards.

    A PostgreSQL server is reached first, so an unreachable one fails in one sentence with the
    fix before anything starts (no progress bar, no half-done step). SQLite is not opened here:
    looking must not create an empty dataset file.
    """
    eng = engine(backend, **kwargs)
    try:
        if backend == "postgres":
            check_connection(eng)
        yield eng
    finally:
        eng.dispose()


def _seed(args) -> int:
    for backend in args.backend or ["sqlite"]:
        with _database(backend, scale=args.scale) as eng:
            before = seed.read_manifest(eng)
            counts = seed.seed_dataset(eng, args.scale, force=args.force)
            after = seed.read_manifest(eng)
        state = "already up to date" if before == after else f"loaded in {after['load_seconds']:.1f}s"
        summary = ", ".join(f"{table} {n:,}" for table, n in counts.items())
        print(f"{backend} {after['scale']}: {state} ({summary})")
    return 0


def _drop(args) -> int:
    for backend in args.backend or ["sqlite"]:
        namespace = namespace_for(args.scale)
        with _database(backend, namespace=namespace):
            drop_namespace(backend, namespace)
        print(f"{backend}: dropped {namespace}")
    return 0


def _services(args) -> int:
    if args.action == "up":
        started = services.up()
        # A configured server is only named by its variable, not started: reach both once, so
        # `up` never lists a server that does not answer.
        with _database("postgres"):
            pass
        services.redis_client().close()
        for name, url in started.items():
            print(f"{name}: {url}")
    elif args.action == "down":
        for name, was_running in services.down().items():
            print(f"{name}: {'stopped' if was_running else 'was not running'}")
    else:
        for name, line in services.status().items():
            print(f"{name}: {line}")
    return 0


def _export(args) -> int:
    from .export import export_parquet  # noqa: PLC0415 - pyarrow is slow to import; only export needs it

    with _database(args.backend, scale=args.scale) as eng:
        paths = export_parquet(eng)
    for table, path in paths.items():
        print(f"{table}: {path}")
    return 0


def _doctor(_args) -> int:
    return doctor.main()


#: Sub-commands with their own argument parsers: (module, function, help).
DELEGATED = {
    "bench": ("perfcourse.bench", "main", "seeding rate against the raw driver path"),
    "grade": ("perfcourse.grading.runner", "main_grade", "grade notebooks (save them first!)"),
    "assign": ("perfcourse.authoring", "main_assign", "generate learner notebooks from masters"),
    "outputs": ("perfcourse.authoring", "main_outputs", "re-execute masters to refresh outputs"),
    "reset": ("perfcourse.authoring", "main_reset", "restore a learner notebook (yours is backed up)"),
}


def _delegate(name: str, argv: list[str]) -> int:
    module, function, _ = DELEGATED[name]
    return int(getattr(importlib.import_module(module), function)(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perfcourse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("doctor", help="check this machine is ready for the course").set_defaults(run=_doctor)

    seed_command = commands.add_parser("seed", help="load the shop dataset (idempotent)")
    seed_command.add_argument("--scale", default=None, help="tiny, small (default) or large")
    seed_command.add_argument("--backend", action="append", choices=["sqlite", "postgres"],
                              help="repeat for both (default: sqlite)")
    seed_command.add_argument("--force", action="store_true", help="rebuild even when up to date")
    seed_command.set_defaults(run=_seed)

    drop_command = commands.add_parser("drop", help="delete a dataset (the next `seed` rebuilds it)")
    drop_command.add_argument("--scale", default=None, help="tiny, small (default) or large")
    drop_command.add_argument("--backend", action="append", choices=["sqlite", "postgres"],
                              help="repeat for both (default: sqlite)")
    drop_command.set_defaults(run=_drop)

    services_command = commands.add_parser("services", help="embedded PostgreSQL and Redis")
    services_command.add_argument("action", choices=["status", "up", "down"], nargs="?", default="status")
    services_command.set_defaults(run=_services)

    export_command = commands.add_parser("export", help="write the dataset to Parquet for DuckDB")
    export_command.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    export_command.add_argument("--scale", default=None)
    export_command.set_defaults(run=_export)

    for name, (_, _, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _backend_failure(exc: BaseException) -> str | None:
    """One line for an error raised by a database, Redis or the disk: the reason and the fix.

    None for anything else, which is a bug and keeps its traceback. Errors are recognised by
    the module of the driver's own error, so nothing is imported here: a psycopg, sqlite3 or
    redis error exists only if the command imported that package.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig  # SQLAlchemy's wrapper adds the statement; the driver says what happened
    package = type(exc).__module__.partition(".")[0]
    lines = str(exc).strip().splitlines()
    reason = (lines[0] if lines else type(exc).__name__).rstrip(".")
    if package == "psycopg":
        return f"PostgreSQL failed: {reason}. {_POSTGRES_FIX}"
    if package == "redis":
        return f"Redis failed: {reason}. {_REDIS_FIX}"
    if package == "sqlite3":
        if (getattr(exc, "sqlite_errorname", None) or "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return (
                f"The SQLite dataset is damaged ({reason}). Run `perfcourse seed --force` to "
                "rebuild it."
            )
        return (
            f"SQLite failed: {reason}. Check that the data folder (PERFCOURSE_DATA, default "
            "data/) is writable and has free space, then run the command again."
        )
    if isinstance(exc, OSError):
        unreachable = isinstance(exc, ConnectionError | TimeoutError | socket.gaierror)
        if unreachable or exc.errno in _UNREACHABLE:
            return f"A server did not answer ({reason}). {_SERVER_FIX}"
        if exc.errno in _DISK_FULL:
            return (
                f"The disk is full ({reason}). Free some space, or point PERFCOURSE_DATA at a "
                "folder on a disk with room, then run the command again."
            )
        if exc.errno in _NOT_WRITABLE and exc.filename:
            return (
                f"Not allowed to write there ({reason}). Make that folder writable, or point "
                "PERFCOURSE_DATA at one that is, then run the command again."
            )
        if exc.filename:
            return f"{reason}. Check that path, then run the command again."
        return f"{reason}. Run `perfcourse doctor`: it checks the setup and says what to fix."
    return None


def main(argv: list[str] | None = None) -> int:
    """Run a `perfcourse` command; return its exit status.

    A failure the learner can fix (a course error, a server or disk error) is one line on
    stderr, ``error: <what went wrong>. <what to do>``, and status 2, never a traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in DELEGATED:
            return _delegate(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-done was kept; run the command again.", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _backend_failure(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
