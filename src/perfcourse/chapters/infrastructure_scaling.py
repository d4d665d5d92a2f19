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

For the lab (``07-infrastructure-scaling-lab``):

* :func:`lab_application` (:data:`LAB_APP`, what gunicorn loads) - the app above, plus
  ``/shop/<endpoint>``: the endpoints of :data:`SHOP_MIX`, whose work is not shown (some compute,
  some wait); each answer says in ``X-Cpu-Ms`` and ``X-Wall-Ms`` the CPU time and the wall time it
  took. ``/checkout`` is a payment (a request that must not run twice). ``/health`` answers 503
  while the file named by ``PERFCOURSE_INFRA_DRAIN`` exists (a backend being deployed).
* :func:`measure_profile`, :func:`mix_load`, :func:`worker_memory_mb` - a measured profile per
  endpoint, a load that follows the mix, and the memory of a server's workers.
* :func:`send` - one request to a backend that says how it failed: :class:`BackendRefused` (the
  request never left: safe to send elsewhere) or :class:`BackendNoResponse` (it was sent, no
  answer came back: the backend may have acted on it).
* :func:`failover_trial` - three real backends behind a balancer class the notebook writes: one
  being deployed, one killed in the middle of the load; it counts every request and every attempt.

Import cost matters here: gunicorn workers import this module, so heavy imports (pandas) are
done inside the functions that need them.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import tempfile
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
from ..load import HttpLoadResult, http_load
from ..net import LOOPBACK
from ..web import get

__all__ = [
    "APP",
    "BackendError",
    "BackendNoResponse",
    "BackendRefused",
    "failover_trial",
    "FailoverTrial",
    "kill",
    "LAB_APP",
    "lab_application",
    "measure_profile",
    "mix_load",
    "send",
    "SHOP_MIX",
    "worker_memory_mb",
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


#: The work behind each shop endpoint: (iterations of :func:`cpu_work`, milliseconds of waiting).
#: Not shown in the lab: it measures them (:func:`measure_profile`).
_SHOP_WORK = {"catalog": (90_000, 2), "search": (30_000, 10), "account": (15_000, 25),
              "checkout": (8_000, 80)}


def _shop(endpoint: str, start_response):
    started, cpu_started = time.perf_counter(), time.thread_time()
    iterations, wait_ms = _SHOP_WORK[endpoint]
    cpu_work(iterations)
    time.sleep(wait_ms / 1000)
    cpu_ms = (time.thread_time() - cpu_started) * 1000
    wall_ms = (time.perf_counter() - started) * 1000
    return _respond(start_response, {"endpoint": endpoint},
                    extra=[("X-Cpu-Ms", f"{cpu_ms:.3f}"), ("X-Wall-Ms", f"{wall_ms:.3f}")])


def lab_application(environ, start_response):
    """The lab's WSGI callable: the shop's endpoints, a payment, a health check that can drain,
    and every endpoint of :func:`application` (see the module docstring)."""
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/health":
        drain = os.environ.get("PERFCOURSE_INFRA_DRAIN")
        if drain and os.path.exists(drain):
            return _respond(start_response, "draining", status="503 Service Unavailable")
    if path.startswith("/shop/") and path[len("/shop/"):] in _SHOP_WORK:
        return _shop(path[len("/shop/"):], start_response)
    if path == "/checkout":
        time.sleep(float(query.get("ms", 60)) / 1000)  # the payment provider's answer
        return _respond(start_response, {"order": query.get("req", ""), "charged": True})
    return application(environ, start_response)


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
#: What gunicorn loads for the lab: :func:`lab_application`.
LAB_APP = "perfcourse.chapters.infrastructure_scaling:lab_application"


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


# --------------------------------------------------------------------------------------------
# The lab: a measured mix of endpoints, and a balancer's failover counted request by request

#: The shop's traffic: each endpoint's share of the requests (what the access log says).
SHOP_MIX = {"/shop/catalog": 0.45, "/shop/search": 0.30, "/shop/account": 0.15, "/shop/checkout": 0.10}


def _mix_paths(mix: dict[str, float], requests: int, seed: int) -> list[str]:
    """``requests`` paths in the proportions of ``mix`` (largest remainders), shuffled by ``seed``."""
    total = sum(mix.values())
    exact = {path: requests * share / total for path, share in mix.items()}
    counts = {path: int(value) for path, value in exact.items()}
    for path in sorted(exact, key=lambda p: exact[p] - counts[p], reverse=True)[: requests - sum(counts.values())]:
        counts[path] += 1
    paths = [path for path, count in counts.items() for _ in range(count)]
    random.Random(seed).shuffle(paths)
    return paths


def mix_load(port: int, mix: dict[str, float], *, requests: int, concurrency: int, seed: int = 0,
             timeout_s: float = 10.0, max_duration_s: float = 30.0) -> HttpLoadResult:
    """Send ``requests`` GETs spread over the paths of ``mix`` in its proportions (a shuffled,
    seeded order), from ``concurrency`` threads with one keep-alive connection each, as
    with :func:`perfcourse.load.http_load`. Loopback only; bounded."""
    if requests < 0 or concurrency < 1:
        raise ValueError("requests >= 0 and concurrency >= 1")
    return http_load(port, _mix_paths(mix, requests, seed), requests=requests, concurrency=concurrency,
                     timeout_s=timeout_s, max_duration_s=max_duration_s)


def measure_profile(port: int, mix: dict[str, float], *, samples: int = 5):
    """The profile of each endpoint of ``mix``, measured by the app itself: ``samples`` requests
    per endpoint, one at a time (no queueing, no other request competing for the CPU). One row
    per endpoint: ``endpoint``, ``share``, ``cpu_ms`` (median CPU time of the request's thread),
    ``wait_ms`` (median wall time minus CPU time: sleeping, waiting on I/O)."""
    import pandas as pd  # noqa: PLC0415 - gunicorn workers import this module: keep it light

    rows = []
    for path, share in mix.items():
        cpu, wall = [], []
        for _ in range(samples):
            status, headers, _ = get(port, path)
            if status != 200 or "X-Cpu-Ms" not in headers:
                raise RuntimeError(f"{path} answered {status} without a profile: is it a /shop endpoint?")
            cpu.append(float(headers["X-Cpu-Ms"]))
            wall.append(float(headers["X-Wall-Ms"]))
        cpu_ms, wall_ms = sorted(cpu)[len(cpu) // 2], sorted(wall)[len(wall) // 2]
        rows.append({"endpoint": path, "share": share, "cpu_ms": round(cpu_ms, 2),
                     "wait_ms": round(max(wall_ms - cpu_ms, 0.0), 2)})
    return pd.DataFrame(rows)


def worker_memory_mb(server) -> list[float]:
    """Resident memory (RSS, MB) of each worker process of a running gunicorn ``server``: what
    one more worker would cost, at most (with ``preload`` part of it is shared with the master)."""
    import psutil  # noqa: PLC0415 - only the notebook process needs it

    children = psutil.Process(server.pid).children()
    return sorted(round(child.memory_info().rss / 2**20, 1) for child in children)


class BackendError(OSError):
    """A backend did not answer a request sent with :func:`send`."""


class BackendRefused(BackendError):
    """No connection: nothing listens on the backend's port. The request was never sent, so it is
    safe to send it to another backend, whatever its method."""


class BackendNoResponse(BackendError):
    """The request was sent but no answer came back (the backend died or timed out): the backend
    may have acted on it."""


def send(port: int, method: str, path: str, timeout_s: float = 5.0, *, on_sent=None) -> web.HttpResponse:
    """One HTTP request (``GET``, ``POST``...) to the backend on ``port`` (loopback), over a fresh
    connection. Returns ``HttpResponse(status, headers, body)``; raises :class:`BackendRefused` when
    the connection fails (the request never left) and :class:`BackendNoResponse` when it broke or
    timed out after the request was sent. ``on_sent`` is called once the request is written."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise BackendRefused(f"port {port}: {exc}") from None
        try:
            conn.request(method, path)
            if on_sent is not None:
                on_sent()
            response = conn.getresponse()
            return web.HttpResponse(response.status, dict(response.getheaders()), response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise BackendNoResponse(f"port {port}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def kill(server, timeout_s: float = 5.0) -> None:
    """Kill a gunicorn ``server`` the hard way (SIGKILL to its process group, as a crash or an
    out-of-memory kill would): requests in flight get no answer. Returns once its port refuses
    connections (its workers, which hold the listening socket too, may outlive the master by a
    moment)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    try:
        server.process.wait(timeout_s)
    except Exception:  # noqa: BLE001 - stop() at the end of its block tries again
        pass
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, server.port), timeout=0.2).close()
        except ConnectionRefusedError:
            return
        except OSError:
            pass
        time.sleep(0.01)


@dataclass
class _Attempt:
    request: int | None
    phase: int
    backend: str
    method: str
    path: str
    started: float
    sent: bool = False
    outcome: str = "pending"  # "answered", "refused", "no response"
    status: int = 0
    ended: float = 0.0


def _status_of(reply) -> int | None:
    """The status of what a balancer's ``handle`` returned: an HttpResponse, a tuple whose first
    item is the status, or anything with an int ``status``; None if it is none of those."""
    status = getattr(reply, "status", None)
    if status is None and isinstance(reply, tuple) and reply:
        status = reply[0]
    if isinstance(status, bool) or not isinstance(status, int):
        return None
    return status


@dataclass
class FailoverTrial:
    """What :func:`failover_trial` saw: the roles, one row per request and one per attempt.

    ``requests`` columns: ``request, phase, method, status, error, attempts, verdict`` where the
    verdict is ``served`` (200), ``unknown outcome`` (a POST that reached a backend that died,
    answered 5xx and not sent again: right, nobody knows if it was charged), ``unsafe retry`` (a
    POST sent again after reaching a backend that died), or ``lost`` (anything else: a request
    a backend could have served). ``attempts`` columns: ``request, phase, backend, method, path,
    sent, outcome, status``. ``to_down`` counts attempts sent to a backend after a health check
    found it down and before another found it up; ``revived`` the requests the deployed backend
    answered after the health check found it up again.
    """

    roles: dict[str, str]
    killed_after: int
    requests: object  # pandas DataFrame
    attempts: object  # pandas DataFrame
    to_down: dict[str, int]
    revived: int
    served_before_kill: dict[str, int]

    def summary(self) -> dict:
        """A table row: requests, served, lost, unknown outcome, unsafe retries, rerouted (served
        after more than one attempt), sent to a down backend, served by the revived backend."""
        verdicts = self.requests.verdict.value_counts()
        rerouted = int(((self.requests.attempts > 1) & (self.requests.verdict == "served")).sum())
        return {"requests": len(self.requests), "served": int(verdicts.get("served", 0)),
                "lost": int(verdicts.get("lost", 0)),
                "unknown_outcome": int(verdicts.get("unknown outcome", 0)),
                "unsafe_retries": int(verdicts.get("unsafe retry", 0)), "rerouted": rerouted,
                "sent_to_down": sum(self.to_down.values()), "revived_served": self.revived}


def _classify(method: str, status: int | None, error, attempts: list[_Attempt]) -> str:
    no_response = [i for i, a in enumerate(attempts) if a.outcome == "no response"]
    if method == "POST" and no_response and len(attempts) > no_response[0] + 1:
        return "unsafe retry"
    if error is None and status == 200 and any(a.outcome == "answered" and a.status == 200 for a in attempts):
        return "served"
    if (error is None and method == "POST" and no_response and status is not None and status >= 500
            and attempts[-1].outcome == "no response"):
        return "unknown outcome"
    return "lost"


def failover_trial(balancer_class, *, seed: int = 1, requests: tuple[int, int] = (60, 40),
                   concurrency: int = 6, post_share: float = 0.4, call: Callable | None = None,
                   per_call_timeout_s: float = 20.0) -> FailoverTrial:
    """Three real backends (gunicorn, 1 worker x 4 threads each) behind ``balancer_class``, one of
    them being deployed, another killed mid-load; every request and every attempt counted.

    The balancer is built as ``balancer_class(backends, send)``: ``backends`` maps names
    (``"a"``, ``"b"``, ``"c"``) to ports, ``send`` is :func:`send` with a recorder around it (the
    balancer must reach its backends through it). It must have ``check_health()`` and
    ``handle(method, path)``, which returns the response to give the client. The seed picks the
    roles and the moment:

    1. The backend being deployed answers ``/health`` with 503 (it still serves everything else).
       ``check_health()`` runs once, at start-up.
    2. Phase 1: ``requests[0]`` requests from ``concurrency`` threads: ``GET /io?ms=30`` (a page,
       idempotent) and ``POST /checkout?ms=60`` (a payment, ``post_share`` of them). After a
       request the seed picks has started, the backend to kill is killed (SIGKILL) as soon as it
       has a POST and, if one comes within a moment, a GET in flight.
    3. The deploy ends (its ``/health`` answers 200 again) and ``check_health()`` runs.
    4. Phase 2: ``requests[1]`` more requests.

    ``call(fn, *args)`` runs every call into the balancer (default: a plain call; a grader passes
    one that limits time and reports errors). Every backend is killed at the end, even on error.
    """
    import pandas as pd  # noqa: PLC0415 - gunicorn workers import this module: keep it light

    call = call or (lambda fn, *args: fn(*args))
    rng = random.Random(seed)
    names = ["a", "b", "c"]
    deployed, killed = rng.sample(names, 2)
    steady = next(n for n in names if n not in (deployed, killed))
    roles = {"deployed": deployed, "killed": killed, "steady": steady}
    total = sum(requests)
    plan = [("POST", f"/checkout?ms=60&req={i}") if rng.random() < post_share else ("GET", f"/io?ms=30&req={i}")
            for i in range(total)]
    kill_after = rng.randrange(requests[0] // 4, requests[0] // 2)
    lock = threading.Lock()
    attempts: list[_Attempt] = []
    phase = [0]
    ports: dict[int, str] = {}

    def recorded_send(port, method, path, timeout_s=5.0, **_ignored):
        try:
            request = int(str(path).rsplit("req=", 1)[1]) if "req=" in str(path) else None
        except ValueError:
            request = None
        attempt = _Attempt(request, phase[0], ports.get(port, f"port {port}"), str(method), str(path),
                           time.perf_counter())
        with lock:
            attempts.append(attempt)

        def mark_sent():
            attempt.sent = True

        try:
            response = send(port, method, path, timeout_s, on_sent=mark_sent)
        except BackendRefused:
            attempt.outcome = "refused"
            raise
        except BackendNoResponse:
            attempt.outcome = "no response"
            raise
        finally:
            attempt.ended = time.perf_counter()
        attempt.outcome, attempt.status = "answered", response.status
        return response

    results: dict[int, tuple] = {}
    started = threading.Event()
    killed_at = [None]

    def run_phase(number: int, indices: list[int], server_to_kill=None) -> None:
        phase[0] = number
        queue = list(indices)

        def client():
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop(0)
                if i == kill_after:
                    started.set()
                method, path = plan[i]
                try:
                    reply = call(balancer.handle, method, path)
                    results[i] = (_status_of(reply), None)
                except BaseException as exc:  # noqa: BLE001 - learner code: record, go on
                    results[i] = (None, exc)

        def killer():
            started.wait(per_call_timeout_s)
            deadline = time.perf_counter() + 2.0
            want_get_until = time.perf_counter() + 1.0  # a GET in flight too, if one comes
            while time.perf_counter() < deadline:
                with lock:
                    flying = [a for a in attempts if a.backend == killed and a.sent and a.outcome == "pending"]
                post = any(a.method == "POST" for a in flying)
                get_too = any(a.method == "GET" for a in flying)
                if post and (get_too or time.perf_counter() > want_get_until):
                    break
                time.sleep(0.002)
            time.sleep(0.005)  # let the backend read the request it was just sent
            kill(server_to_kill)
            killed_at[0] = time.perf_counter()

        threads = [threading.Thread(target=client, daemon=True, name=f"trial-client-{k}")
                   for k in range(concurrency)]
        if server_to_kill is not None:
            threads.append(threading.Thread(target=killer, daemon=True, name="trial-killer"))
        for thread in threads:
            thread.start()
        deadline = time.perf_counter() + per_call_timeout_s * 2 + 10
        for thread in threads:
            thread.join(max(0.0, deadline - time.perf_counter()))
        if server_to_kill is not None and killed_at[0] is None:  # the balancer never reached the moment
            started.set()
            kill(server_to_kill)
            killed_at[0] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="perfcourse-failover-") as tmp:
        flags = {name: Path(tmp) / f"{name}.deploying" for name in names}
        contexts = {name: serve(LAB_APP, workers=1, worker_class="gthread", threads=4, preload=True,
                                env={"PERFCOURSE_INFRA_DRAIN": str(flags[name])}) for name in names}
        servers: dict = {}
        failures: list[BaseException] = []

        def start(name):  # the three boot side by side: a boot is mostly waiting for imports
            try:
                servers[name] = contexts[name].__enter__()
            except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
                failures.append(exc)

        try:
            starters = [threading.Thread(target=start, args=(name,), daemon=True) for name in names]
            for thread in starters:
                thread.start()
            for thread in starters:
                thread.join()
            if failures:
                raise failures[0]
            for name in names:
                ports[servers[name].port] = name
            flags[deployed].touch()  # after start-up: serve() waits for /health to answer 200
            backends = {name: servers[name].port for name in names}
            balancer = call(balancer_class, dict(backends), recorded_send)
            phase[0] = 0
            call(balancer.check_health)
            run_phase(1, list(range(requests[0])), servers[killed])
            flags[deployed].unlink()
            phase[0] = 2
            call(balancer.check_health)
            run_phase(2, list(range(requests[0], total)))
        finally:
            for name, server in servers.items():
                kill(server)
                contexts[name].__exit__(None, None, None)

    by_request: dict[int, list[_Attempt]] = {}
    for attempt in attempts:
        if attempt.request is not None:
            by_request.setdefault(attempt.request, []).append(attempt)
    rows = []
    for i in range(total):
        method, _ = plan[i]
        status, error = results.get(i, (None, TimeoutError("handle() did not return")))
        mine = by_request.get(i, [])
        rows.append({"request": i, "phase": 1 if i < requests[0] else 2, "method": method,
                     "status": status, "error": error, "attempts": len(mine),
                     "verdict": _classify(method, status, error, mine)})
    attempt_rows = pd.DataFrame(
        [{"request": a.request, "phase": a.phase, "backend": a.backend, "method": a.method, "path": a.path,
          "sent": a.sent, "outcome": a.outcome, "status": a.status, "started": a.started} for a in attempts],
        columns=["request", "phase", "backend", "method", "path", "sent", "outcome", "status", "started"])
    loads = attempt_rows[attempt_rows.request.notna()]
    before_kill = loads[(loads.phase == 1) & (loads.started < (killed_at[0] or float("inf")))]
    to_down = {deployed: int(((loads.phase == 1) & (loads.backend == deployed)).sum()),
               killed: int(((loads.phase == 2) & (loads.backend == killed)).sum())}
    revived = int(((loads.phase == 2) & (loads.backend == deployed) & (loads.outcome == "answered")).sum())
    served_before = {name: int(((before_kill.backend == name) & (before_kill.outcome == "answered")).sum())
                     for name in names}
    return FailoverTrial(roles=roles, killed_after=kill_after, requests=pd.DataFrame(rows),
                         attempts=attempt_rows.drop(columns="started"), to_down=to_down, revived=revived,
                         served_before_kill=served_before)
