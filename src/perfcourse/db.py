"""SQLAlchemy engines for the course's two databases.

>>> from perfcourse.db import engine
>>> sqlite = engine("sqlite")            # data/shop_small.sqlite
>>> pg = engine("postgres")              # DATABASE_URL, or the embedded server; schema shop_small

Each dataset lives in a *namespace*: a file ``data/<namespace>.sqlite`` on SQLite, a schema
``<namespace>`` on PostgreSQL (the engine sets ``search_path`` to it). The default namespace is
``shop_<scale>``, so the tiny test dataset and the small course dataset never collide, and tests
can use a namespace of their own and drop it afterwards.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .config import data_dir, default_scale, get_scale
from .errors import BackendUnavailable, InvalidChoice
from .services import postgres_url

__all__ = [
    "BACKENDS",
    "backend_of",
    "check_backend",
    "check_connection",
    "drop_namespace",
    "engine",
    "namespace_for",
    "namespace_of",
    "scale_of",
    "sqlite_path",
]

BACKENDS = ("sqlite", "postgres")
_NAMESPACE = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")


def namespace_for(scale: str | None = None) -> str:
    """The default namespace of a scale's dataset: ``shop_<scale>``."""
    return f"shop_{get_scale(scale or default_scale()).name}"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InvalidChoice(f"Unknown backend {backend!r}: use 'sqlite' or 'postgres'.")
    return backend


def sqlite_path(namespace: str):
    return data_dir() / f"{namespace}.sqlite"


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers in other kernels never block a writer
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def engine(
    backend: str = "sqlite",
    *,
    scale: str | None = None,
    namespace: str | None = None,
    echo: bool = False,
    url: str | sa.URL | None = None,
    **engine_kwargs,
) -> Engine:
    """Return a SQLAlchemy 2 engine for ``backend`` (``"sqlite"`` or ``"postgres"``).

    ``scale`` picks the dataset (``tiny``, ``small``, ``large``; default ``PERFCOURSE_SCALE`` or
    ``small``); ``namespace`` overrides the file/schema name outright. ``url`` (PostgreSQL only)
    names the server instead of ``DATABASE_URL``/the embedded one, e.g. a latency proxy in front
    of it. Extra keyword arguments go to :func:`sqlalchemy.create_engine` (``pool_size``,
    ``poolclass``, ``pool_pre_ping``...).
    The engine only connects when used; seed it with :func:`perfcourse.seed.seed_dataset`.
    """
    check_backend(backend)
    namespace = namespace or namespace_for(scale)
    if not _NAMESPACE.match(namespace):
        raise InvalidChoice(
            f"Namespace {namespace!r} must be lower-case letters, digits and underscores."
        )
    if backend == "sqlite":
        eng = sa.create_engine(f"sqlite:///{sqlite_path(namespace)}", echo=echo, **engine_kwargs)
        sa.event.listen(eng, "connect", _sqlite_pragmas)
    else:
        connect_args = dict(engine_kwargs.pop("connect_args", {}))
        connect_args.setdefault("options", f"-csearch_path={namespace},public")
        connect_args.setdefault("connect_timeout", 5)
        engine_kwargs.setdefault("pool_pre_ping", True)
        eng = sa.create_engine(
            url or postgres_url(), echo=echo, connect_args=connect_args, **engine_kwargs
        )
    eng.perfcourse_namespace = namespace  # type: ignore[attr-defined]
    eng.perfcourse_scale = get_scale(scale or default_scale()).name  # type: ignore[attr-defined]
    return eng


def namespace_of(eng: Engine) -> str:
    """The namespace an engine from :func:`engine` points at."""
    try:
        return eng.perfcourse_namespace  # type: ignore[attr-defined]
    except AttributeError:
        raise ValueError("This engine was not made by perfcourse.db.engine().") from None


def scale_of(eng: Engine) -> str:
    """The scale of the dataset an engine from :func:`engine` points at (scratch copies keep
    their source's)."""
    try:
        return eng.perfcourse_scale  # type: ignore[attr-defined]
    except AttributeError:
        raise ValueError("This engine was not made by perfcourse.db.engine().") from None


def backend_of(eng: Engine) -> str:
    """``"sqlite"`` or ``"postgres"`` for an engine."""
    return "postgres" if eng.dialect.name == "postgresql" else eng.dialect.name


def check_connection(eng: Engine) -> None:
    """Connect once, turning a failure into one sentence that says what to do."""
    try:
        with eng.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise BackendUnavailable(
            f"Cannot connect to {eng.url.render_as_string(hide_password=True)}: {reason}. "
            "Check DATABASE_URL (or unset it to use the embedded server) and run "
            "`perfcourse doctor`."
        ) from None


def drop_namespace(backend: str, namespace: str) -> None:
    """Delete a namespace: the SQLite file(s) or the PostgreSQL schema. Used by tests."""
    if backend == "sqlite":
        path = sqlite_path(namespace)
        for suffix in ("", "-wal", "-shm", "-journal", ".loading"):
            (path.parent / (path.name + suffix)).unlink(missing_ok=True)
        return
    eng = engine("postgres", namespace=namespace)
    try:
        with eng.begin() as conn:
            conn.execute(sa.text(f'drop schema if exists "{namespace}" cascade'))
            conn.execute(sa.text(f'drop schema if exists "{namespace}__loading" cascade'))
    finally:
        eng.dispose()
