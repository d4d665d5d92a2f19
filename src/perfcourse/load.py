"""Load generation: a closed loop of worker threads, for any callable or for HTTP on loopback.

:func:`run_load` is the one load generator of the course: ``workers`` threads take request
numbers from a shared counter, run ``work(i)``, record when each started and ended and what it
returned, and (optionally) sample how many requests are in flight. :func:`http_load` drives an
HTTP server on loopback with it, one keep-alive connection per thread.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from .net import LOOPBACK
from .stats import percentile, percentiles

__all__ = ["HttpLoadResult", "HttpSample", "LoadRun", "http_load", "run_load"]


@dataclass
class LoadRun:
    """The record of :func:`run_load`: one row per request, plus the in-flight samples.

    ``log`` has the columns ``request, start_s, end_s, duration_s, result`` (seconds since the
    run started; ``result`` is what ``work`` returned, None when it raised).
    """

    workers: int
    log: pd.DataFrame
    in_flight_samples: list[int] = field(repr=False)
    elapsed_s: float

    @property
    def throughput_per_s(self) -> float:
        """Requests completed per second of the run (X)."""
        return len(self.log) / self.elapsed_s

    @property
    def mean_latency_s(self) -> float:
        """Mean time a request spent in flight (R)."""
        return float(self.log["duration_s"].mean())

    @property
    def predicted_L(self) -> float:
        """Little's law: L = X * R."""
        return self.throughput_per_s * self.mean_latency_s

    @property
    def sampled_L(self) -> float:
        """L counted directly: the mean of the in-flight samples."""
        samples = self.in_flight_samples
        return sum(samples) / len(samples) if samples else float("nan")

    def as_row(self) -> dict:
        """A table row: ``workers, requests, elapsed_s, per_request_s, mean_latency_s,
        p95_latency_s, throughput_per_s`` (``per_request_s`` is 1 / X)."""
        return {
            "workers": self.workers,
            "requests": len(self.log),
            "elapsed_s": self.elapsed_s,
            "per_request_s": 1 / self.throughput_per_s,
            "mean_latency_s": self.mean_latency_s,
            "p95_latency_s": percentile(self.log["duration_s"], 95),
            "throughput_per_s": self.throughput_per_s,
        }


def run_load(
    work: Callable[[int], Any],
    *,
    workers: int,
    requests: int,
    think_s: float = 0.0,
    sample_every_s: float | None = 0.0005,
    max_duration_s: float | None = None,
) -> LoadRun:
    """Run ``work(i)`` for ``i`` in ``range(requests)`` on ``workers`` threads, recording each call.

    A closed loop, like a pool of users: each worker takes the next request, runs it, waits
    ``think_s`` (the user reading the page), and takes the next. A sampler thread counts the
    requests in flight every ``sample_every_s`` (None: no sampling). Bounded: no request starts
    after ``max_duration_s``. ``work`` must be thread-safe (e.g. open its own connection from an
    engine's pool); an exception in it is recorded as ``result=None`` and the run goes on.
    """
    if workers < 1 or requests < 0:
        raise ValueError("workers must be at least 1 and requests at least 0.")
    lock = threading.Lock()
    state = {"next": 0, "in_flight": 0}
    rows: list[tuple[int, float, float, Any]] = []
    samples: list[int] = []
    done = threading.Event()
    origin = time.perf_counter()
    deadline = origin + max_duration_s if max_duration_s is not None else float("inf")

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= requests or time.perf_counter() > deadline:
                    return
                state["next"] = i + 1
                state["in_flight"] += 1
                start = time.perf_counter()
            result = None
            try:
                result = work(i)
            except Exception:  # noqa: BLE001 - one failed request must not stop the load
                result = None
            finally:
                with lock:
                    end = time.perf_counter()
                    state["in_flight"] -= 1
                    rows.append((i, start - origin, end - origin, result))
            if think_s:
                time.sleep(think_s)

    def sampler() -> None:
        while not done.wait(sample_every_s):
            samples.append(state["in_flight"])

    threads = [threading.Thread(target=worker, name=f"load-{n}", daemon=True)
               for n in range(min(workers, max(requests, 1)))]
    watcher = threading.Thread(target=sampler, name="load-sampler", daemon=True)
    if sample_every_s:
        watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - origin
    done.set()
    if sample_every_s:
        watcher.join()
    rows.sort(key=lambda row: row[0])
    # gunicorn workers import this module (through the app server's warm-up); pandas would cost
    # each of them a third of a second and 40 MB, so it is imported only when a run ends.
    import pandas as pd  # noqa: PLC0415 - see above

    log = pd.DataFrame(rows, columns=["request", "start_s", "end_s", "result"])
    log["duration_s"] = log["end_s"] - log["start_s"]
    log = log[["request", "start_s", "end_s", "duration_s", "result"]]
    return LoadRun(workers=workers, log=log, in_flight_samples=samples, elapsed_s=elapsed)


# ---------------------------------------------------------------------------------------------
# HTTP on loopback


@dataclass
class HttpSample:
    """One request: latency, HTTP status (0: no answer), worker pid and balancer backend (from
    the ``X-Worker-Pid`` and ``X-Backend`` response headers, when the server sets them)."""

    latency_s: float
    status: int
    pid: str = ""
    backend: str = ""


@dataclass
class HttpLoadResult:
    """What :func:`http_load` measured: every sample, the run's length, the requests asked for."""

    samples: list[HttpSample]
    elapsed_s: float
    requested: int

    @property
    def ok(self) -> int:
        """Requests answered 200."""
        return sum(1 for s in self.samples if s.status == 200)

    @property
    def throughput_per_s(self) -> float:
        """Requests answered 200 per second of the run."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency(self, q: float) -> float:
        """The ``q`` quantile (0-1) of the latencies of the requests answered 200."""
        values = [s.latency_s for s in self.samples if s.status == 200]
        return percentile(values, 100 * q) if values else float("nan")

    def by_pid(self) -> Counter:
        """Requests answered 200 per worker process."""
        return Counter(s.pid for s in self.samples if s.status == 200)

    def by_backend(self) -> Counter:
        """Requests answered 200 per balancer backend."""
        return Counter(s.backend for s in self.samples if s.status == 200)

    def summary(self) -> dict:
        """A table row: requests, served, elapsed, throughput, p50 and p95 latency."""
        served = [s.latency_s for s in self.samples if s.status == 200]
        p50, p95 = percentiles(served, (50, 95)) if served else (float("nan"), float("nan"))
        return {"requests": self.requested, "served": len(served), "elapsed_s": self.elapsed_s,
                "throughput_per_s": self.throughput_per_s, "p50_s": p50, "p95_s": p95}


def http_load(port: int, path: str | Sequence[str], *, requests: int, concurrency: int,
              timeout_s: float = 10.0, max_duration_s: float = 30.0, host: str = LOOPBACK) -> HttpLoadResult:
    """Send ``requests`` GETs for ``path`` from ``concurrency`` threads; return every sample.

    ``path`` is one path, or one per request (a mix of endpoints, in the order to send them).

    Each thread keeps one ``http.client`` connection (reopened when the server closes it, as
    gunicorn's sync workers do after every response). Bounded: at most ``requests`` requests, no
    new request after ``max_duration_s``, each waits at most ``timeout_s``. Loopback only.
    """
    if host not in (LOOPBACK, "localhost", "::1"):
        raise ValueError("http_load sends load to loopback only (127.0.0.1)")
    if requests < 0 or concurrency < 1:
        raise ValueError("requests >= 0 and concurrency >= 1")
    if not isinstance(path, str) and len(path) < requests:
        raise ValueError(f"{requests} requests need {requests} paths, got {len(path)}")
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []

    def get(i: int) -> HttpSample:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            opened.append(conn)
        t0 = time.perf_counter()
        try:
            conn.request("GET", path if isinstance(path, str) else path[i])
            resp = conn.getresponse()
            resp.read()
            return HttpSample(time.perf_counter() - t0, resp.status,
                              resp.getheader("X-Worker-Pid", ""), resp.getheader("X-Backend", ""))
        except (OSError, http.client.HTTPException):
            conn.close()  # reconnects on the next request
            return HttpSample(time.perf_counter() - t0, 0)

    try:
        run = run_load(get, workers=concurrency, requests=requests, sample_every_s=None,
                       max_duration_s=max_duration_s)
    finally:
        for conn in opened:
            conn.close()
    return HttpLoadResult(list(run.log["result"]), run.elapsed_s, requests)
