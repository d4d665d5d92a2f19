"""Chapter 07, infrastructure scaling: a real app server, a load generator and a load balancer.

* :func:`create_app` - a small WSGI application (the app gunicorn serves): ``/io`` sleeps
  (I/O-bound), ``/cpu`` runs a fixed pure-Python loop (CPU-bound), ``/orders`` queries the SQLite
  dataset, ``/db`` reports which process opened the database connection it used (``/db?replica=1``:
  on the read-replica engine), ``/health`` answers ``ok``. Every response carries
  ``X-Worker-Pid``: the process that served it.
* :func:`serve` - gunicorn serving that app, through the course's app server
  (:func:`perfcourse.web.serve`); load comes from :func:`perfcourse.load.http_load`.
* :class:`LoadBalancer` - a tiny threaded HTTP reverse proxy in front of several backends; a
  function passed in picks the backend (the lesson writes its round robin in a cell), with
  health checks and retry on a dead backend.
* :func:`simulate_server` - a model server (processes x threads, the GIL, cores) run in real time
  for half a second, for the notebook's slider.
* :func:`throughput_by_server` - the measurement helper of the notebook: one server per case,
  one load per server, one row per case.

Import cost matters here: gunicorn workers import this module, so heavy imports (pandas) are
done inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import sqlalchemy as sa

from .. import db, web
from ..load import http_load
from ..net import LOOPBACK
from ..web import get

__all__ = [
    "APP",
    "CPU_WORK",
    "ENGINE",
    "application",
    "Backend",
    "connection_origins",
    "cpu_work",
    "create_app",
    "database_path",
    "make_engine",
    "next_healthy",
    "READ_ENGINE",
    "LoadBalancer",
    "serve",
    "simulate_server",
    "throughput_by_server",
]

#: Iterations of the pure-Python loop one ``/cpu`` request runs by default (about 10 ms).
CPU_WORK = 150_000

# --------------------------------------------------------------------------------------------
# The WSGI application

#: The engine of the application in this process (set by :func:`create_app`).
ENGINE = None
#: The engine of the app's read replica, when it has one (``create_app(replica=True)``).
READ_ENGINE = None
#: Pooled connections this process closed although another process opened them (inherited
#: through fork): closing them from a child ends the parent's session on a shared socket.
_closed_inherited = 0


def database_path() -> Path:
    """The SQLite file the app queries: ``PERFCOURSE_INFRA_DB`` or the course's ``small`` dataset."""
    if os.environ.get("PERFCOURSE_INFRA_DB"):
        return Path(os.environ["PERFCOURSE_INFRA_DB"])
    return db.sqlite_path(db.namespace_for("small"))


def make_engine(path: Path | str | None = None):
    """A SQLAlchemy engine on the SQLite file; each pooled connection remembers the pid that opened it.

    ``connection.info["opened_by_pid"]`` is set when the DBAPI connection is created: a request
    served by process B over a connection opened by process A is using an inherited connection.
    A process that closes a connection another process opened is counted too (``/db`` reports
    it as ``closed_inherited``).
    """
    eng = sa.create_engine(f"sqlite:///{path or database_path()}",
                           connect_args={"check_same_thread": False}, pool_size=5)

    @sa.event.listens_for(eng, "connect")
    def _remember_pid(dbapi_connection, connection_record):
        connection_record.info["opened_by_pid"] = os.getpid()

    @sa.event.listens_for(eng, "close")
    def _count_inherited_close(dbapi_connection, connection_record):
        global _closed_inherited
        if connection_record.info.get("opened_by_pid", os.getpid()) != os.getpid():
            _closed_inherited += 1

    return eng


def cpu_work(n: int = CPU_WORK) -> int:
    """A fixed amount of pure-Python work: it holds the GIL from start to end."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total


def _respond(start_response, body: dict | str, status: str = "200 OK", extra=()):
    data = (json.dumps(body) if isinstance(body, dict) else body).encode()
    headers = [("Content-Type", "application/json" if isinstance(body, dict) else "text/plain"),
               ("Content-Length", str(len(data))), ("X-Worker-Pid", str(os.getpid())), *extra]
    start_response(status, headers)
    return [data]


def application(environ, start_response):
    """The WSGI callable: see the module docstring for the endpoints."""
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/health":
        return _respond(start_response, "ok")
    if path == "/io":
        time.sleep(float(query.get("ms", 20)) / 1000)
        return _respond(start_response, {"slept_ms": float(query.get("ms", 20))})
    if path == "/cpu":
        return _respond(start_response, {"result": cpu_work(int(query.get("n", CPU_WORK)))})
    if path in ("/orders", "/db"):
        global ENGINE, READ_ENGINE
        if query.get("replica") == "1":
            if READ_ENGINE is None:
                READ_ENGINE = make_engine()
            engine = READ_ENGINE
        else:
            if ENGINE is None:
                ENGINE = make_engine()
            engine = ENGINE
        user_id = int(query.get("user", 1))
        with engine.connect() as conn:
            count, total = conn.exec_driver_sql(
                "SELECT count(*), coalesce(sum(total), 0) FROM orders WHERE user_id = ?",
                (user_id,)).one()
            opened_by = conn.connection.info.get("opened_by_pid")
        body = {"user": user_id, "orders": count, "total": round(float(total), 2),
                "opened_by_pid": opened_by, "closed_inherited": _closed_inherited}
        return _respond(start_response, body, extra=[("X-Connection-Pid", str(opened_by)),
                                                     ("X-Closed-Inherited", str(_closed_inherited))])
    return _respond(start_response, "not found", status="404 Not Found")


def create_app(connect_at_boot: bool = False, replica: bool = False):
    """The application factory gunicorn calls (:data:`APP`).

    With ``connect_at_boot`` the engine is created and one query runs now, as many apps do at
    start-up (a schema check, a warm-up): its pool then holds an open connection. Under
    ``--preload`` that happens in the gunicorn master, before the workers are forked. With
    ``replica`` as well, a second engine (:data:`READ_ENGINE`, the read replica; here on the same
    SQLite file) is created and queried at boot the same way.
    """
    global ENGINE, READ_ENGINE
    if connect_at_boot:
        ENGINE = make_engine()
        engines = [ENGINE]
        if replica:
            READ_ENGINE = make_engine()
            engines.append(READ_ENGINE)
        for engine in engines:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").all()
    return application


#: What gunicorn loads: the application factory of this module.
APP = "perfcourse.chapters.infrastructure_scaling:create_app()"


def serve(app: str = APP, **settings):
    """gunicorn serving this chapter's app for a ``with`` block: ``workers``, ``threads``,
    ``worker_class``, ``preload``, ``hooks``... as :func:`perfcourse.web.serve` takes them. Every
    worker has served a 30 ms ``/io`` request before the block starts."""
    return web.serve(app, warm_path="/io?ms=30", **settings)


def throughput_by_server(cases: Sequence[dict], path: str, *, requests: int, concurrency: int):
    """The measurement helper: for each case (settings of :func:`serve` plus a ``case`` label),
    start gunicorn, send the load, stop it. One row per case: settings, requests served,
    throughput (``throughput_per_s``), median and 95th percentile latency.

    Servers preload the app unless a case says ``preload=False``: this app opens nothing at
    import, so preloading is safe, and a server boots with one import of the course's package
    (about a second of CPU) instead of one per worker."""
    import pandas as pd  # noqa: PLC0415 - gunicorn workers import this module: keep it light

    rows = []
    for case in cases:
        settings = {"preload": True, **{k: v for k, v in case.items() if k != "case"}}
        with serve(**settings) as server:
            result = http_load(server.port, path, requests=requests, concurrency=concurrency)
        rows.append({"case": case.get("case", ""), "worker_class": settings.get("worker_class", "sync"),
                     "workers": settings.get("workers", 1), "threads": settings.get("threads", 1),
                     **result.summary()})
    return pd.DataFrame(rows)


def connection_origins(*, preload: bool, hooks: str = "", workers: int = 2, requests: int = 40,
                       startup_timeout_s: float = 30.0, replica: bool = False) -> dict:
    """Run gunicorn whose app connects to the database at boot; count requests per connection origin.

    Returns how many of ``requests`` sequential ``/db`` requests were answered over a connection
    opened by another process (inherited through fork) and over one the worker opened itself,
    and the most inherited connections one worker closed (``closed_inherited``). With
    ``replica`` the app also opens its read replica at boot and every other request reads from
    it; ``inherited_replica`` counts those answered over an inherited replica connection.
    """
    factory = f"create_app(connect_at_boot=True{', replica=True' if replica else ''})"
    with serve(workers=workers, preload=preload, hooks=hooks, startup_timeout_s=startup_timeout_s,
               app=APP.replace("create_app()", factory)) as server:
        inherited = own = inherited_replica = closed = 0
        for i in range(requests):
            on_replica = replica and i % 2 == 1
            status, headers, _ = get(server.port, f"/db?user={i + 1}" + ("&replica=1" if on_replica else ""))
            if status != 200:
                continue
            closed = max(closed, int(headers.get("X-Closed-Inherited", 0)))
            if headers.get("X-Connection-Pid") == headers.get("X-Worker-Pid"):
                own += 1
            else:
                inherited += 1
                inherited_replica += on_replica
        return {"preload_app": preload, "post_fork": "yes" if hooks else "none",
                "requests": requests, "inherited_connection": inherited, "own_connection": own,
                "inherited_replica": inherited_replica, "closed_inherited": closed,
                "config": server.config}


# --------------------------------------------------------------------------------------------
# A load balancer whose choice is a function


def next_healthy(healthy: Sequence[bool], previous: int) -> int:
    """Round robin over the healthy backends: the first healthy index after ``previous``
    (wrapping around), -1 if none. The default choice of :class:`LoadBalancer`; the lesson writes
    its own in a cell and passes it in."""
    n = len(healthy)
    for step in range(1, n + 1):
        index = (previous + step) % n
        if healthy[index]:
            return index
    return -1


@dataclass
class Backend:
    name: str
    port: int
    healthy: bool = True


class LoadBalancer:
    """A reverse proxy on ``127.0.0.1`` (free port) in front of backends; ``choose`` picks one.

    ``choose(healthy, previous)`` gets one boolean per backend and the index it chose last
    (``-1`` at first) and returns the index of the backend for this request, or ``-1`` when none
    will do (the proxy answers 503); it is called under a lock, one request at a time. The
    default, :func:`next_healthy`, is round robin over the healthy backends.

    A health check (:meth:`check_health`, what a real balancer runs every few seconds) GETs
    ``/health`` on each backend and marks it. A request to a backend that does not answer marks
    it unhealthy and is retried on the next one (counted in ``rerouted``). ``served`` counts
    requests per backend name. Use as a context manager.
    """

    def __init__(self, backends: dict[str, int], choose: Callable[[list[bool], int], int] = next_healthy,
                 health_path: str = "/health", timeout_s: float = 10.0):
        self.backends = [Backend(name, port) for name, port in backends.items()]
        self.choose = choose
        self.health_path, self.timeout_s = health_path, timeout_s
        self.served: Counter = Counter()
        self.rerouted = 0
        self.unavailable = 0
        self._lock = threading.Lock()
        self._previous = -1
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def health(self) -> dict[str, bool]:
        return {b.name: b.healthy for b in self.backends}

    def check_health(self) -> dict[str, bool]:
        for backend in self.backends:
            try:
                backend.healthy = get(backend.port, self.health_path, timeout_s=1.0)[0] == 200
            except OSError:
                backend.healthy = False
        return self.health()

    def _choose(self) -> Backend | None:
        with self._lock:
            index = self.choose([b.healthy for b in self.backends], self._previous)
            if index < 0 or not self.backends[index].healthy:
                return None
            self._previous = index
            return self.backends[index]

    def forward(self, path: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one GET to the next healthy backend (retrying on the others); return the answer."""
        for _ in range(len(self.backends)):
            backend = self._choose()
            if backend is None:
                break
            try:
                status, headers, body = get(backend.port, path, timeout_s=self.timeout_s)
            except OSError:
                with self._lock:
                    backend.healthy = False
                    self.rerouted += 1
                continue
            with self._lock:
                self.served[backend.name] += 1
            keep = [(k, v) for k, v in headers.items() if k.lower() in ("content-type", "x-worker-pid")]
            return status, keep + [("X-Backend", backend.name)], body
        with self._lock:
            self.unavailable += 1
        return 503, [("Content-Type", "text/plain")], b"no healthy backend"

    def start(self) -> LoadBalancer:
        balancer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # the name the http.server API calls
                status, headers, body = balancer.forward(self.path)
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> LoadBalancer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Sizing: a server simulated in real time, fast enough for a slider


def simulate_server(*, workers: int, threads: int, io_fraction: float, request_ms: float = 10.0,
                    cores: int | None = None, seconds: float = 0.5) -> dict:
    """Requests per second of a model server of ``workers`` processes x ``threads`` threads,
    run in real time for ``seconds`` with threads of this process (a gunicorn takes a second or
    more to start: too slow to re-run on every move of a slider).

    Every thread serves requests back to back (there is always a request waiting). A request
    computes for ``(1 - io_fraction) * request_ms`` while holding its process's interpreter lock
    (one thread per process computes at a time: the GIL) and one of ``cores`` cores, then waits
    ``io_fraction * request_ms`` holding neither (a query, an API call). Computing is simulated
    with ``sleep``, so the model costs this kernel little CPU. Returns the requests completed
    within the window per second (``throughput_per_s``) and the bound the model predicts
    (``model_per_s``): ``min(workers * threads / request, min(workers, cores) / cpu_part)``.
    """
    if workers < 1 or threads < 1 or not 0.0 <= io_fraction <= 1.0:
        raise ValueError("workers and threads must be at least 1, io_fraction between 0 and 1")
    cores = cores or os.cpu_count() or 1
    cpu_s = (1.0 - io_fraction) * request_ms / 1000
    wait_s = io_fraction * request_ms / 1000
    core_slots = threading.Semaphore(cores)
    interpreter_locks = [threading.Lock() for _ in range(workers)]
    completed = [0] * (workers * threads)  # one slot per thread: no shared counter to race on
    deadline = time.perf_counter() + seconds

    def serve_requests(process: int, slot: int) -> None:
        done = 0
        while time.perf_counter() < deadline:
            if cpu_s > 0:
                with interpreter_locks[process], core_slots:
                    time.sleep(cpu_s)
            if wait_s > 0:
                time.sleep(wait_s)
            done += time.perf_counter() <= deadline
        completed[slot] = done

    pool = [threading.Thread(target=serve_requests, args=(slot // threads, slot), daemon=True)
            for slot in range(workers * threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(seconds + 5)
    request_s = request_ms / 1000
    bounds = [workers * threads / request_s]
    if cpu_s > 0:
        bounds.append(min(workers, cores) / cpu_s)
    return {"workers": workers, "threads": threads, "io_fraction": io_fraction, "cores": cores,
            "served": sum(completed), "throughput_per_s": sum(completed) / seconds,
            "model_per_s": min(bounds)}
