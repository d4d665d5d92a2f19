"""A real PostgreSQL primary and one real streaming replica (chapter 03 and its lab use them).

:func:`start_replica_pair` starts both from the binaries the ``pgserver`` package ships, under
``data/replication/`` (never the course's main server under ``data/postgres``): ``primary/`` made
by ``initdb`` with ``wal_level=replica``, ``replica/`` made by ``pg_basebackup -R``. The replica
replays with a ``recovery_min_apply_delay``, so replication lag is visible and reproducible.
Both listen on unix sockets only. :func:`stop_replica_pair` stops them; ``perfcourse services
down`` does too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .config import data_dir
from .errors import BackendUnavailable
from .locks import file_lock

__all__ = [
    "DEFAULT_APPLY_DELAY_MS",
    "pair_users",
    "REPLICATION_DIR",
    "ReplicaPair",
    "replica_pair_running",
    "replication_dir",
    "running_replica_pair",
    "set_apply_delay",
    "start_replica_pair",
    "stop_replica_pair",
]

# pgserver asks platformdirs for a runtime folder, which warns on machines without a login
# session (containers, CI); its fallback is fine (as in services.py).
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

# ---------------------------------------------------------------------------------------------
# 1. A real primary and a real streaming replica
# ---------------------------------------------------------------------------------------------

REPLICATION_DIR = "replication"
#: The replica replays each commit this long after the primary made it (lag you can see).
DEFAULT_APPLY_DELAY_MS = 300
_PG_PORT = 5432  # both servers listen on unix sockets only, each in its own folder


@dataclass(frozen=True)
class ReplicaPair:
    """Where the primary and the replica of :func:`start_replica_pair` listen.

    ``primary_url``/``replica_url`` are SQLAlchemy URLs (psycopg 3, unix sockets);
    ``apply_delay_ms`` is the replica's ``recovery_min_apply_delay``.
    """

    folder: Path
    primary_url: str
    replica_url: str
    apply_delay_ms: int

    def engines(self, **engine_kwargs) -> tuple[Engine, Engine]:
        """``(primary, replica)`` engines. Keyword arguments go to ``create_engine``."""
        return (sa.create_engine(self.primary_url, **engine_kwargs),
                sa.create_engine(self.replica_url, **engine_kwargs))


def _bin(name: str) -> Path:
    from pgserver._commands import POSTGRES_BIN_PATH  # noqa: PLC0415 - pgserver only when the pair is started

    return POSTGRES_BIN_PATH / name


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: as pgserver does, use the 'pgserver' user then."""
    if os.name != "nt" and os.geteuid() == 0:
        from pgserver.utils import ensure_user_exists  # noqa: PLC0415 - pgserver only when the pair is started

        ensure_user_exists("pgserver")
        return "pgserver"
    return None


def _give_to(path: Path, user: str | None) -> None:
    """Let ``user`` (None: ourselves) own ``path`` and traverse every folder above it."""
    if user is None:
        return
    import pwd  # noqa: PLC0415 - pgserver only when the pair is started

    from pgserver.utils import ensure_prefix_permissions  # noqa: PLC0415 - pgserver only when the pair is started

    entry = pwd.getpwnam(user)
    ensure_prefix_permissions(path)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _run(command: list, user: str | None, timeout: float = 60) -> str:
    try:
        done = subprocess.run([str(c) for c in command], check=True, capture_output=True,
                              text=True, timeout=timeout, user=user, cwd="/",
                              env={**os.environ, "HOME": "/tmp", "PGPASSFILE": os.devnull})
    except subprocess.CalledProcessError as exc:
        raise BackendUnavailable(
            f"{Path(command[0]).name} failed: {(exc.stderr or exc.stdout).strip()[-400:]} "
            "Run `perfcourse.replicas.stop_replica_pair(remove=True)` and try again."
        ) from None
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(
            f"{Path(command[0]).name} did not finish in {timeout:g} s. "
            "Run `perfcourse.replicas.stop_replica_pair(remove=True)` and try again."
        ) from None
    return done.stdout


def _postmaster(pgdata: Path):
    """The running server's PostmasterInfo, or None when it is not running and ready."""
    from pgserver.utils import PostmasterInfo  # noqa: PLC0415 - pgserver only when the pair is started

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, AssertionError, ValueError):
        return None
    if info is None or not info.is_running() or info.status != "ready":
        return None
    return info


def _socket_dir(pgdata: Path, user: str | None) -> Path:
    """The folder of the server's socket: ``pgdata`` itself unless that path is too long."""
    from pgserver.postgres_server import PostgresServer  # noqa: PLC0415 - pgserver only when the pair is started
    from pgserver.utils import find_suitable_socket_dir  # noqa: PLC0415 - pgserver only when the pair is started

    folder = find_suitable_socket_dir(pgdata, PostgresServer.runtime_path / "ch03")
    if user is not None and folder != pgdata:
        _give_to(folder, user)
        folder.chmod(0o777)
    return folder


def _url(socket_dir: Path) -> str:
    return f"postgresql+psycopg://postgres@/postgres?host={socket_dir}&port={_PG_PORT}"


def _start(pgdata: Path, user: str | None) -> Path:
    info = _postmaster(pgdata)
    if info is not None:
        return info.socket_dir
    socket_dir = _socket_dir(pgdata, user)
    _run([_bin("pg_ctl"), "-D", pgdata, "-w", "-t", "30", "-l", pgdata / "log",
          "-o", f'-h "" -k {socket_dir} -p {_PG_PORT}', "start"], user, timeout=40)
    for _ in range(100):
        if _postmaster(pgdata) is not None:
            return socket_dir
        time.sleep(0.05)
    raise BackendUnavailable(f"The server in {pgdata} did not become ready; see {pgdata / 'log'}.")


def _alive_pid(pgdata: Path) -> bool:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def replication_dir() -> Path:
    return data_dir() / REPLICATION_DIR


_PRIMARY_SETTINGS = """
# chapter 03: a small primary that streams its WAL to one replica
wal_level = replica
max_wal_senders = 4
hot_standby = on
# (inherited by the replica) report the replica's oldest snapshot to the primary, so cleanup
# there never removes rows a replica query still reads: no "conflict with recovery" cancels
hot_standby_feedback = on
listen_addresses = ''
max_connections = 40
shared_buffers = 16MB
fsync = off               # a teaching pair: speed over crash safety
full_page_writes = off
"""


def start_replica_pair(apply_delay_ms: int = DEFAULT_APPLY_DELAY_MS) -> ReplicaPair:
    """Start (or reuse) a PostgreSQL primary and one streaming replica; return their URLs.

    Under ``data/replication/``: ``primary/`` made by ``initdb`` with ``wal_level=replica``,
    ``replica/`` made by ``pg_basebackup -R`` (which writes ``standby.signal`` and the
    ``primary_conninfo`` to stream from) with ``hot_standby=on`` and
    ``recovery_min_apply_delay = apply_delay_ms``. Each listens on its own unix socket, no TCP.
    Idempotent: a running pair is reused (its apply delay set to ``apply_delay_ms``). The
    first start takes a few seconds; :func:`stop_replica_pair` stops both.
    """
    folder = replication_dir()
    primary_dir, replica_dir = folder / "primary", folder / "replica"
    user = _system_user()
    with file_lock(folder / ".lock"):
        if not (primary_dir / "PG_VERSION").exists():
            shutil.rmtree(primary_dir, ignore_errors=True)
            shutil.rmtree(replica_dir, ignore_errors=True)
            primary_dir.mkdir(parents=True)
            _give_to(primary_dir, user)
            _run([_bin("initdb"), "-D", primary_dir, "--auth=trust", "--encoding=utf8",
                  "-U", "postgres", "--no-sync"], user, timeout=120)
            with open(primary_dir / "postgresql.conf", "a") as conf:
                conf.write(_PRIMARY_SETTINGS)
        primary_socket = _start(primary_dir, user)
        if not (replica_dir / "standby.signal").exists():
            shutil.rmtree(replica_dir, ignore_errors=True)
            replica_dir.mkdir(parents=True)
            _give_to(replica_dir, user)
            replica_dir.chmod(0o700)
            _run([_bin("pg_basebackup"), "-D", replica_dir, "-R", "-X", "stream",
                  "--checkpoint=fast", "--no-sync", "-h", primary_socket, "-p", _PG_PORT,
                  "-U", "postgres"], user, timeout=120)
            with open(replica_dir / "postgresql.auto.conf", "a") as conf:
                conf.write(f"recovery_min_apply_delay = '{int(apply_delay_ms)}ms'\n")
            # the copy carries the primary's socket lock and log (they live in its folder)
            for leftover in [*replica_dir.glob(".s.PGSQL.*"), replica_dir / "log"]:
                leftover.unlink(missing_ok=True)
        replica_socket = _start(replica_dir, user)
        _take_lease(folder)
    pair = ReplicaPair(folder, _url(primary_socket), _url(replica_socket), int(apply_delay_ms))
    _wait_streaming(pair)
    set_apply_delay(pair, apply_delay_ms)
    return pair


def _wait_streaming(pair: ReplicaPair, timeout_s: float = 20.0) -> None:
    engine = sa.create_engine(pair.replica_url, poolclass=sa.pool.NullPool)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                status = conn.exec_driver_sql("SELECT status FROM pg_stat_wal_receiver").scalar()
            if status == "streaming":
                return
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise BackendUnavailable(
        f"The replica does not stream from the primary; see {pair.folder / 'replica' / 'log'}. "
        "Run `perfcourse.replicas.stop_replica_pair(remove=True)` and try again.")


def set_apply_delay(pair: ReplicaPair, apply_delay_ms: int) -> ReplicaPair:
    """Change the replica's ``recovery_min_apply_delay`` (``ALTER SYSTEM`` + reload)."""
    engine = sa.create_engine(pair.replica_url, poolclass=sa.pool.NullPool,
                              isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            current = conn.exec_driver_sql("SHOW recovery_min_apply_delay").scalar()
            wanted = f"{int(apply_delay_ms)}ms"
            if _delay_ms(current) != int(apply_delay_ms):
                conn.exec_driver_sql(f"ALTER SYSTEM SET recovery_min_apply_delay = '{wanted}'")
                conn.exec_driver_sql("SELECT pg_reload_conf()")
                for _ in range(100):
                    if _delay_ms(conn.exec_driver_sql("SHOW recovery_min_apply_delay")
                                 .scalar()) == int(apply_delay_ms):
                        break
                    time.sleep(0.02)
    finally:
        engine.dispose()
    return ReplicaPair(pair.folder, pair.primary_url, pair.replica_url, int(apply_delay_ms))


def _delay_ms(text: str) -> int:
    """``'300ms'``, ``'1s'``, ``'0'`` -> milliseconds."""
    text = text.strip()
    for unit, factor in (("ms", 1), ("s", 1000), ("min", 60_000), ("h", 3_600_000)):
        if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
            return int(text[: -len(unit)]) * factor
    return int(text) if text.isdigit() else -1


def replica_pair_running() -> bool:
    folder = replication_dir()
    return all(_postmaster(folder / name) is not None for name in ("primary", "replica"))


def _leases(folder: Path) -> Path:
    return folder / "users"


def _take_lease(folder: Path, pid: int | None = None) -> None:
    """Record that process ``pid`` (default: this one) uses the pair."""
    leases = _leases(folder)
    leases.mkdir(parents=True, exist_ok=True)
    (leases / str(pid or os.getpid())).touch()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def pair_users(folder: Path | None = None) -> list[int]:
    """Process ids that started (or reused) the pair and have not stopped it; dead ones pruned."""
    leases = _leases(folder or replication_dir())
    alive = []
    for lease in sorted(leases.glob("*")) if leases.is_dir() else []:
        pid = int(lease.name) if lease.name.isdigit() else -1
        if pid > 0 and _pid_alive(pid):
            alive.append(pid)
        else:
            lease.unlink(missing_ok=True)
    return alive


def stop_replica_pair(remove: bool = False) -> bool:
    """Stop the replica, then the primary; return whether this call stopped anything.

    A process that started the pair (:func:`start_replica_pair`) holds a lease on it; its stop
    gives the lease back and stops the servers only when no other live process holds one, so a
    notebook, a grader and a test run that share the pair never stop it under each other.
    A process without a lease (``perfcourse services down``) or ``remove=True`` stops it
    whoever uses it. ``remove=True`` also deletes ``data/replication/`` (the next start
    rebuilds it).
    """
    folder = replication_dir()
    user = _system_user() if folder.exists() else None
    stopped = False
    with file_lock(folder / ".lock"):
        mine = _leases(folder) / str(os.getpid())
        had_lease = mine.exists()
        mine.unlink(missing_ok=True)
        if had_lease and not remove and pair_users(folder):
            return False  # someone else still uses it
        for name in ("replica", "primary"):
            pgdata = folder / name
            if _alive_pid(pgdata):
                with contextlib.suppress(BackendUnavailable):
                    _run([_bin("pg_ctl"), "-D", pgdata, "-w", "-t", "30", "-m", "fast", "stop"],
                         user, timeout=40)
                stopped = True
        shutil.rmtree(_leases(folder), ignore_errors=True)
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
    return stopped


def running_replica_pair() -> ReplicaPair | None:
    """The pair of :func:`start_replica_pair` when both servers run (its apply delay as set
    now), else None. Starts and changes nothing: a grader uses it to leave the pair as it was."""
    folder = replication_dir()
    infos = [_postmaster(folder / name) for name in ("primary", "replica")]
    if None in infos:
        return None
    replica_url = _url(infos[1].socket_dir)
    engine = sa.create_engine(replica_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            delay = _delay_ms(conn.exec_driver_sql("SHOW recovery_min_apply_delay").scalar())
    finally:
        engine.dispose()
    return ReplicaPair(folder, _url(infos[0].socket_dir), replica_url, delay)
