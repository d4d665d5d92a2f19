"""Chapter 07, infrastructure scaling: a real app server, a load generator and a load balancer.

* :func:`create_app` - a small WSGI application (the app gunicorn serves): ``/io`` sleeps
  (I/O-bound), ``/cpu`` runs a fixed pure-Python loop (CPU-bound), ``/orders`` queries the SQLite
  dataset, ``/db`` reports which process opened the database connection it used, ``/health``
  answers ``ok``. Every response carries ``X-Worker-Pid``: the process that served it.
* :func:`serve` - start gunicorn as a subprocess on ``127.0.0.1`` and a free port, from a config
  file written to a temporary folder; wait until it answers; always stop it (the whole process
  group) when the ``with`` block ends.
* :func:`run_load` - a bounded load generator: a thread pool of ``http.client`` connections,
  a fixed number of requests, a time limit, loopback only; per-request latency and worker pid.
* :class:`RoundRobinBalancer` - a tiny threaded HTTP reverse proxy in front of several backends,
  round robin over the healthy ones, with health checks and retry on a dead backend.
* :func:`throughput_by_server` - the measurement helper of the notebook: one server per case,
  one load per server, one row per case.

Import cost matters here: gunicorn workers import this module, so heavy imports (pandas) are
done inside the functions that need them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

LOOPBACK = "127.0.0.1"
#: Iterations of the pure-Python loop one ``/cpu`` request runs by default (about 10 ms).
CPU_WORK = 150_000

# --------------------------------------------------------------------------------------------
# The WSGI application

#: The engine of the application in this process (set by :func:`create_app`).
ENGINE = None


def database_path() -> Path:
    """The SQLite file the app queries: ``PERFCOURSE_INFRA_DB`` or the course's ``small`` dataset."""
    if os.environ.get("PERFCOURSE_INFRA_DB"):
        return Path(os.environ["PERFCOURSE_INFRA_DB"])
    from . import db

    return db.sqlite_path(db.namespace_for("small"))


def make_engine(path: Path | str | None = None):
    """A SQLAlchemy engine on the SQLite file; each pooled connection remembers the pid that opened it.

    ``connection.info["opened_by_pid"]`` is set when the DBAPI connection is created: a request
    served by process B over a connection opened by process A is using an inherited connection.
    """
    import sqlalchemy as sa

    eng = sa.create_engine(f"sqlite:///{path or database_path()}",
                           connect_args={"check_same_thread": False}, pool_size=5)

    @sa.event.listens_for(eng, "connect")
    def _remember_pid(dbapi_connection, connection_record):
        connection_record.info["opened_by_pid"] = os.getpid()

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
        global ENGINE
        if ENGINE is None:
            ENGINE = make_engine()
        user_id = int(query.get("user", 1))
        with ENGINE.connect() as conn:
            count, total = conn.exec_driver_sql(
                "SELECT count(*), coalesce(sum(total), 0) FROM orders WHERE user_id = ?",
                (user_id,)).one()
            opened_by = conn.connection.info.get("opened_by_pid")
        body = {"user": user_id, "orders": count, "total": round(float(total), 2),
                "opened_by_pid": opened_by}
        return _respond(start_response, body, extra=[("X-Connection-Pid", str(opened_by))])
    return _respond(start_response, "not found", status="404 Not Found")


def create_app(connect_at_boot: bool = False):
    """The application factory gunicorn calls (``perfcourse.infra:create_app()``).

    With ``connect_at_boot`` the engine is created and one query runs now, as many apps do at
    start-up (a schema check, a warm-up): its pool then holds an open connection. Under
    ``--preload`` that happens in the gunicorn master, before the workers are forked.
    """
    global ENGINE
    if connect_at_boot:
        ENGINE = make_engine()
        with ENGINE.connect() as conn:
            conn.exec_driver_sql("SELECT 1").all()
    return application


#: The post_fork hook of the course: forget (do not close) the connections inherited from the master.
POST_FORK_DISPOSE = '''
def post_fork(server, worker):
    from perfcourse import infra
    if infra.ENGINE is not None:
        infra.ENGINE.dispose(close=False)  # drop the master's connections, keep them open for it
'''

# --------------------------------------------------------------------------------------------
# gunicorn as a subprocess


def free_port() -> int:
    """A TCP port on loopback that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def gunicorn_config(*, workers: int = 1, threads: int = 1, worker_class: str = "sync",
                    preload: bool = False, hooks: str = "") -> str:
    """The text of a gunicorn config file (a Python file) for these settings."""
    text = textwrap.dedent(f"""\
        workers = {workers}
        threads = {threads}
        worker_class = {worker_class!r}
        preload_app = {preload}
        loglevel = "warning"
        timeout = 30
        graceful_timeout = 2
        """)
    return text + (textwrap.dedent(hooks).strip() + "\n" if hooks.strip() else "")


@dataclass
class Server:
    """A running gunicorn: its port, master process and config text."""

    port: int
    process: subprocess.Popen
    config: str
    log_path: Path
    workers: int = 1

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the master and its workers (the whole process group); idempotent."""
        _stop_group(self.process, timeout_s)


#: gunicorn masters started by :func:`serve` in this process and not stopped yet.
_RUNNING: set[subprocess.Popen] = set()


def running_servers() -> int:
    """How many gunicorn servers started here are still running (0 after every ``with`` block)."""
    return sum(1 for p in list(_RUNNING) if p.poll() is None)


def _stop_group(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # Workers orphaned by a crashed master are in the same group: make sure they are gone too.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass


def get(port: int, path: str = "/health", timeout_s: float = 5.0) -> tuple[int, dict, bytes]:
    """One GET on loopback: (status, headers, body)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"gunicorn exited with code {server.process.returncode}:\n{server.log()[-2000:]}")
        try:
            if get(server.port, "/health", timeout_s=1.0)[0] == 200:
                break
        except OSError:
            time.sleep(0.05)
    else:
        raise TimeoutError(f"gunicorn did not answer within {timeout_s:g} s:\n{server.log()[-2000:]}")
    # Wait (bounded) until every worker has booted, so a measurement does not include boot time.
    pids: set[str] = set()
    while len(pids) < server.workers and time.monotonic() < deadline:
        result = run_load(server.port, "/io?ms=30", requests=2 * server.workers,
                          concurrency=server.workers, timeout_s=5.0, max_duration_s=5.0)
        pids |= {s.pid for s in result.samples if s.pid}


@contextmanager
def serve(*, workers: int = 1, threads: int = 1, worker_class: str = "sync", preload: bool = False,
          hooks: str = "", app: str = "perfcourse.infra:create_app()", env: dict | None = None,
          startup_timeout_s: float = 30.0) -> Iterator[Server]:
    """Run gunicorn on ``127.0.0.1`` and a free port for the ``with`` block; always stop it.

    The config file is written to a temporary folder (``server.config`` holds its text). The
    block starts once ``/health`` answers and every worker has served a request; on exit (or on
    any error) the process group gets SIGTERM, then SIGKILL, and the folder is removed.
    """
    with tempfile.TemporaryDirectory(prefix="perfcourse-gunicorn-") as tmp:
        config = gunicorn_config(workers=workers, threads=threads, worker_class=worker_class,
                                 preload=preload, hooks=hooks)
        config_path = Path(tmp) / "gunicorn.conf.py"
        config_path.write_text(config)
        log_path = Path(tmp) / "gunicorn.log"
        last_error: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between the check and the bind
            port = free_port()
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-c", str(config_path),
                     "--bind", f"{LOOPBACK}:{port}", app],
                    cwd=tmp, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **(env or {})}, start_new_session=True)
            server = Server(port, process, config, log_path, workers)
            _RUNNING.add(process)
            try:
                _wait_ready(server, startup_timeout_s)
            except RuntimeError as exc:  # exited: maybe the port was taken; try another
                last_error = exc
                _stop_group(process)
                _RUNNING.discard(process)
                continue
            except BaseException:
                _stop_group(process)
                _RUNNING.discard(process)
                raise
            try:
                yield server
            finally:
                _stop_group(process)
                _RUNNING.discard(process)
            return
        raise RuntimeError(f"gunicorn did not start: {last_error}")


# --------------------------------------------------------------------------------------------
# The load generator


@dataclass
class Sample:
    """One request: latency, HTTP status (0: no answer), worker pid and balancer backend."""

    latency_s: float
    status: int
    pid: str = ""
    backend: str = ""


@dataclass
class LoadResult:
    samples: list[Sample]
    elapsed_s: float
    requested: int

    @property
    def ok(self) -> int:
        return sum(1 for s in self.samples if s.status == 200)

    @property
    def throughput_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency(self, q: float) -> float:
        values = sorted(s.latency_s for s in self.samples if s.status == 200)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    def by_pid(self) -> Counter:
        return Counter(s.pid for s in self.samples if s.status == 200)

    def by_backend(self) -> Counter:
        return Counter(s.backend for s in self.samples if s.status == 200)

    def summary(self) -> dict:
        return {"requests": self.requested, "served": self.ok, "elapsed_s": self.elapsed_s,
                "throughput_per_s": self.throughput_per_s, "p50_s": self.latency(0.50),
                "p95_s": self.latency(0.95)}


def run_load(port: int, path: str, *, requests: int, concurrency: int, timeout_s: float = 10.0,
             max_duration_s: float = 30.0, host: str = LOOPBACK) -> LoadResult:
    """Send ``requests`` GETs for ``path`` from ``concurrency`` threads; return every sample.

    Each thread keeps one ``http.client`` connection (reopened when the server closes it, as
    gunicorn's sync workers do after every response). Bounded: at most ``requests`` requests, no
    new request after ``max_duration_s``, each waits at most ``timeout_s``. Loopback only.
    """
    if host not in (LOOPBACK, "localhost", "::1"):
        raise ValueError("run_load sends load to loopback only (127.0.0.1)")
    if requests < 0 or concurrency < 1:
        raise ValueError("requests >= 0 and concurrency >= 1")
    lock = threading.Lock()
    tickets = iter(range(requests))
    samples: list[Sample] = []
    started = time.perf_counter()
    deadline = started + max_duration_s

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            while True:
                with lock:
                    if next(tickets, None) is None or time.perf_counter() > deadline:
                        return
                t0 = time.perf_counter()
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    resp.read()
                    sample = Sample(time.perf_counter() - t0, resp.status,
                                    resp.getheader("X-Worker-Pid", ""), resp.getheader("X-Backend", ""))
                except (OSError, http.client.HTTPException):
                    sample = Sample(time.perf_counter() - t0, 0)
                    conn.close()
                with lock:
                    samples.append(sample)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, max(requests, 1)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_duration_s + timeout_s + 5)
    return LoadResult(samples, time.perf_counter() - started, requests)


def throughput_by_server(cases: Sequence[dict], path: str, *, requests: int, concurrency: int):
    """The measurement helper: for each case (settings of :func:`serve` plus a ``case`` label),
    start gunicorn, send the load, stop it. One row per case: settings, requests served,
    throughput (``throughput_per_s``), median and 95th percentile latency."""
    import pandas as pd

    rows = []
    for case in cases:
        settings = {k: v for k, v in case.items() if k != "case"}
        with serve(**settings) as server:
            result = run_load(server.port, path, requests=requests, concurrency=concurrency)
        rows.append({"case": case.get("case", ""), "worker_class": settings.get("worker_class", "sync"),
                     "workers": settings.get("workers", 1), "threads": settings.get("threads", 1),
                     **result.summary()})
    return pd.DataFrame(rows)


def connection_origins(*, preload: bool, hooks: str = "", workers: int = 2, requests: int = 40,
                       startup_timeout_s: float = 30.0) -> dict:
    """Run gunicorn whose app connects to the database at boot; count requests per connection origin.

    Returns how many of ``requests`` sequential ``/db`` requests were answered over a connection
    opened by another process (inherited through fork) and over one the worker opened itself.
    """
    with serve(workers=workers, preload=preload, hooks=hooks, startup_timeout_s=startup_timeout_s,
               app="perfcourse.infra:create_app(connect_at_boot=True)") as server:
        inherited = own = 0
        for i in range(requests):
            status, headers, _ = get(server.port, f"/db?user={i + 1}")
            if status != 200:
                continue
            if headers.get("X-Connection-Pid") == headers.get("X-Worker-Pid"):
                own += 1
            else:
                inherited += 1
        return {"preload_app": preload, "post_fork": "dispose(close=False)" if hooks else "none",
                "requests": requests, "inherited_connection": inherited, "own_connection": own,
                "config": server.config}


# --------------------------------------------------------------------------------------------
# A round-robin load balancer


def next_healthy(healthy: Sequence[bool], previous: int) -> int:
    """Index of the first healthy backend after ``previous`` (wrapping around); -1 if none."""
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


class RoundRobinBalancer:
    """A reverse proxy on ``127.0.0.1`` (free port) sending GETs to backends in turn.

    Backends marked unhealthy are skipped. A health check (:meth:`check_health`, what a real
    balancer runs every few seconds) GETs ``/health`` on each backend and marks it. A request
    to a backend that does not answer marks it unhealthy and is retried on the next one (counted
    in ``rerouted``). ``served`` counts requests per backend name. Use as a context manager.
    """

    def __init__(self, backends: dict[str, int], health_path: str = "/health", timeout_s: float = 10.0):
        self.backends = [Backend(name, port) for name, port in backends.items()]
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
            index = next_healthy([b.healthy for b in self.backends], self._previous)
            if index < 0:
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

    def start(self) -> RoundRobinBalancer:
        balancer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
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

    def __enter__(self) -> RoundRobinBalancer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def horizontal_vs_vertical(path: str, *, requests: int, concurrency: int):
    """The same load on one server with 2 workers (vertical) and on two 1-worker servers behind
    the round-robin balancer (horizontal). One row per case, with requests per backend."""
    import pandas as pd

    rows = []
    with serve(workers=2) as server:
        result = run_load(server.port, path, requests=requests, concurrency=concurrency)
    rows.append({"case": "vertical: 1 server, 2 workers", "servers": 1, "processes": 2,
                 **result.summary(), "per_backend": "-"})
    with serve() as a, serve() as b, RoundRobinBalancer({"a": a.port, "b": b.port}) as lb:
        result = run_load(lb.port, path, requests=requests, concurrency=concurrency)
        per_backend = " / ".join(f"{name}: {lb.served[name]}" for name in ("a", "b"))
    rows.append({"case": "horizontal: 2 servers, balanced", "servers": 2, "processes": 2,
                 **result.summary(), "per_backend": per_backend})
    return pd.DataFrame(rows)


def failover(path: str = "/health", *, requests: int = 20, concurrency: int = 4):
    """Two backends behind the balancer; backend b is stopped halfway. Phases, one row each:
    both up (concurrent), b stopped without a health check yet (sequential), after a health
    check (concurrent). Requests per backend and rerouted requests are counted per phase and
    are deterministic."""
    import pandas as pd

    rows = []
    with serve() as a, serve() as b, RoundRobinBalancer({"a": a.port, "b": b.port}) as lb:
        def phase(name, conc):
            before, rerouted = Counter(lb.served), lb.rerouted
            result = run_load(lb.port, path, requests=requests, concurrency=conc)
            served = lb.served - before
            rows.append({"phase": name, "requests": requests, "served": result.ok,
                         "to_a": served["a"], "to_b": served["b"], "rerouted": lb.rerouted - rerouted,
                         "health": ", ".join(f"{k}: {'up' if v else 'down'}" for k, v in lb.health().items())})

        phase("both backends up", concurrency)
        b.stop()
        phase("b stopped, before any health check", 1)
        lb.check_health()
        phase("after the health check", concurrency)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Sizing


def workers_and_threads(cores: int, io_fraction: float, max_threads: int = 32) -> tuple[int, int]:
    """The chapter's sizing rules: one worker process per core; threads per worker
    ``round(1 / (1 - io_fraction))`` (a request waiting a fraction f of its time leaves the
    CPU to 1/(1-f) requests), at least 1, at most ``max_threads``."""
    workers = max(1, int(cores))
    if io_fraction >= 1:
        return workers, max_threads
    threads = round(1 / (1 - max(0.0, io_fraction)))
    return workers, min(max_threads, max(1, threads))
