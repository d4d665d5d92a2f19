"""Chapter 01, performance fundamentals: the code its experiments run, profile and grade.

Latency and percentiles
    :func:`latency_log` (a seeded request log
    of a small web shop, with the slow tail real services have).
Little's law
    :func:`littles_law` (throughput X, mean latency R, L = X * R from a log),
    :func:`in_flight_at` (L counted directly, by sampling). The lesson writes its requests in
    its cells and runs them with the course's load generator :func:`perfcourse.load.run_load`.
Utilisation
    :func:`simulate_queue` (a seeded first-come-first-served queue with ``servers`` workers) and
    :func:`mm1_mean_response` (the textbook curve S / (1 - utilisation)).
Profiling
    :func:`category_revenue_slow` (the worked example of the lesson, whose fix the lesson
    writes in a cell) and :func:`customer_report` (the lab's slow function: find its bottleneck and fix
    it); :func:`perfcourse.profiler.hottest_function` reads the profile.

Everything random is seeded: the same call gives the same numbers on every machine, so the
notebooks can print them without masking.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

__all__ = [
    "ENDPOINTS",
    "RESPONSE_TARGETS_S",
    "category_revenue_slow",
    "as_money",
    "customer_report",
    "favourite_category",
    "in_flight_at",
    "latency_log",
    "littles_law",
    "lookup_category",
    "mm1_mean_response",
    "simulate_queue",
    "user_items",
]

#: The guide's response-time targets, in seconds.
RESPONSE_TARGETS_S = {"database query": 0.100, "API response": 0.200, "complex operation": 0.500}

# ------------------------------------------------------------------------------------------------
# Latency distributions and percentiles
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """How one endpoint of the simulated shop behaves."""

    name: str
    share: float  # of all requests
    median_s: float  # of a normal request
    spread: float  # sigma of the log-normal
    slow_share: float  # requests that hit a slow path (cache miss, lock wait, GC pause...)
    slow_factor: float  # how much slower those are


#: The endpoints of :func:`latency_log`.
ENDPOINTS = (
    Endpoint("GET /products", 0.55, 0.012, 0.35, 0.01, 8.0),
    Endpoint("GET /orders", 0.30, 0.030, 0.45, 0.03, 12.0),
    Endpoint("POST /checkout", 0.15, 0.080, 0.50, 0.06, 10.0),
)


def latency_log(requests: int = 20_000, *, rate_per_s: float = 200.0, seed: int = 1) -> pd.DataFrame:
    """A recorded request log of a small shop: ``endpoint, start_s, duration_s, end_s``.

    Requests arrive at random (a Poisson process of ``rate_per_s``); each endpoint's latency is
    log-normal, and a small share of requests takes a slow path several times longer: the tail
    that the mean hides. Deterministic for a given ``seed``. Rows are in arrival order.
    """
    rng = np.random.default_rng(seed)
    start = np.cumsum(rng.exponential(1 / rate_per_s, requests))
    shares = np.array([e.share for e in ENDPOINTS])
    which = rng.choice(len(ENDPOINTS), size=requests, p=shares / shares.sum())
    duration = np.empty(requests)
    for i, e in enumerate(ENDPOINTS):
        mask = which == i
        n = int(mask.sum())
        base = rng.lognormal(math.log(e.median_s), e.spread, n)
        slow = rng.random(n) < e.slow_share
        duration[mask] = np.where(slow, base * e.slow_factor, base)
    return pd.DataFrame({
        "endpoint": [ENDPOINTS[i].name for i in which],
        "start_s": start,
        "duration_s": duration,
        "end_s": start + duration,
    })


# ------------------------------------------------------------------------------------------------
# Little's law
# ------------------------------------------------------------------------------------------------


def _pairs(log) -> list[tuple[float, float]]:
    if isinstance(log, pd.DataFrame):
        return list(zip(log["start_s"].tolist(), log["end_s"].tolist()))
    return [(float(s), float(e)) for s, e in log]


def littles_law(log) -> dict[str, float]:
    """Throughput, mean latency and L = X * R of a request log.

    ``log`` is a DataFrame with ``start_s`` and ``end_s`` or a list of ``(start_s, end_s)``.
    The observation window runs from the first start to the last end. Returns
    ``requests, window_s, throughput_per_s (X), mean_latency_s (R), L``; L is the mean number of
    requests in flight, X * R, which equals the total time spent in requests over the window.
    """
    pairs = _pairs(log)
    if not pairs:
        raise ValueError("An empty log has no throughput: pass at least one request.")
    first = min(s for s, _ in pairs)
    last = max(e for _, e in pairs)
    window = last - first
    total = sum(e - s for s, e in pairs)
    throughput = len(pairs) / window
    mean_latency = total / len(pairs)
    return {
        "requests": len(pairs),
        "window_s": window,
        "throughput_per_s": throughput,
        "mean_latency_s": mean_latency,
        "L": throughput * mean_latency,
    }


def in_flight_at(log, times: Sequence[float]) -> np.ndarray:
    """How many requests of ``log`` were in flight (``start <= t < end``) at each of ``times``.

    Counting directly, the way a monitoring agent samples a gauge; its mean over evenly spaced
    times is the L that Little's law predicts.
    """
    pairs = _pairs(log)
    starts = np.sort(np.array([s for s, _ in pairs]))
    ends = np.sort(np.array([e for _, e in pairs]))
    t = np.asarray(times, dtype=float)
    return np.searchsorted(starts, t, side="right") - np.searchsorted(ends, t, side="right")


# ------------------------------------------------------------------------------------------------
# Utilisation and queueing
# ------------------------------------------------------------------------------------------------


def simulate_queue(
    utilisation: float,
    *,
    service_time_s: float = 0.010,
    requests: int = 20_000,
    servers: int = 1,
    seed: int = 1,
) -> np.ndarray:
    """Response times (wait + service, seconds) of a first-come-first-served queue.

    Requests arrive at random (Poisson) at the rate that keeps ``servers`` workers busy a share
    ``utilisation`` of the time; service times are random too (exponential, mean
    ``service_time_s``). With one server this is the textbook M/M/1 queue, whose mean response
    time is ``service_time_s / (1 - utilisation)``. Deterministic for a given ``seed``.
    """
    if not 0 < utilisation < 1:
        raise ValueError("utilisation must be between 0 and 1 (exclusive): at 1 the queue grows forever.")
    rng = np.random.default_rng(seed)
    rate = utilisation * servers / service_time_s
    arrivals = np.cumsum(rng.exponential(1 / rate, requests))
    services = rng.exponential(service_time_s, requests)
    if servers == 1:
        # One server, in numpy: request n ends at max over k <= n of (arrival k + the service
        # times of k..n), i.e. work(n) + the running max of (arrival k - work before k). Millions
        # of requests take milliseconds, so a slider can re-run it.
        work = np.cumsum(services)
        finish = work + np.maximum.accumulate(arrivals - (work - services))
        return finish - arrivals
    free_at = [0.0] * servers  # a heap: when each server is next free
    response = np.empty(requests)
    for i in range(requests):
        earliest = heapq.heappop(free_at)
        begin = max(arrivals[i], earliest)
        finish = begin + services[i]
        heapq.heappush(free_at, finish)
        response[i] = finish - arrivals[i]
    return response


def mm1_mean_response(utilisation: float, service_time_s: float = 0.010) -> float:
    """Mean response time of an M/M/1 queue: ``service_time_s / (1 - utilisation)``."""
    return service_time_s / (1 - utilisation)


# ------------------------------------------------------------------------------------------------
# Profiling: the lesson's worked example
# ------------------------------------------------------------------------------------------------

_ITEMS_SQL = sa.text(
    "SELECT oi.product_id, oi.quantity, oi.unit_price FROM order_items oi "
    "JOIN orders o ON o.id = oi.order_id WHERE o.status = 'delivered' "
    "ORDER BY oi.id LIMIT :limit"
)
_PRODUCTS_SQL = sa.text("SELECT id, category_id FROM products ORDER BY id")


def _load_items(engine: Engine, limit: int) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(_ITEMS_SQL, {"limit": limit})]


def _load_products(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(_PRODUCTS_SQL)]


def _find_product(products: list[tuple], product_id: int) -> tuple:
    # A linear search: fine for ten products, not for thousands looked up thousands of times.
    for product in products:
        if product[0] == product_id:
            return product
    raise KeyError(product_id)


def as_money(value) -> Decimal:
    """A price as a Decimal."""
    # SQLite hands NUMERIC back as a float through raw SQL: go through str to keep the cents.
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _add_revenue(totals: dict, category_id: int, quantity: int, unit_price) -> None:
    totals[category_id] = totals.get(category_id, Decimal(0)) + quantity * as_money(unit_price)


def category_revenue_slow(engine: Engine, items: int = 4000) -> dict[int, Decimal]:
    """Revenue per category of the first ``items`` delivered order items: the slow version.

    It loads the items (one query) and the products (one query), then finds each item's
    product with :func:`_find_product`, a linear search through every product.
    """
    products = _load_products(engine)
    totals: dict[int, Decimal] = {}
    for product_id, quantity, unit_price in _load_items(engine, items):
        product = _find_product(products, product_id)
        _add_revenue(totals, product[1], quantity, unit_price)
    return dict(sorted(totals.items()))


# ------------------------------------------------------------------------------------------------
# Profiling: the lab's slow function
# ------------------------------------------------------------------------------------------------

_ORDERS_SQL = (
    "SELECT o.user_id, oi.product_id, oi.quantity, oi.unit_price FROM orders o "
    "JOIN order_items oi ON oi.order_id = o.id WHERE o.user_id IN ({ids}) AND o.status <> 'cancelled' "
    "ORDER BY oi.id"
)
_CATEGORY_SQL = sa.text(
    "SELECT c.name FROM products p JOIN categories c ON c.id = p.category_id WHERE p.id = :id"
)


def lookup_category(conn, product_id: int) -> str:
    """The category name of one product (one query)."""
    return conn.execute(_CATEGORY_SQL, {"id": product_id}).scalar_one()


def user_items(conn, user_ids: Sequence[int]) -> list[tuple]:
    """``(user_id, product_id, quantity, unit_price)`` of the users' order items: one query."""
    ids = ", ".join(str(int(u)) for u in user_ids) or "NULL"
    return [tuple(row) for row in conn.execute(sa.text(_ORDERS_SQL.format(ids=ids)))]


def favourite_category(spent: dict[str, Decimal]) -> str:
    """The category with the most money spent; ties go to the name that sorts first."""
    return min(spent, key=lambda name: (-spent[name], name))


def customer_report(engine: Engine, user_ids: Sequence[int]) -> list[dict]:
    """For each user in ``user_ids`` (sorted) with non-cancelled orders: money spent and the
    favourite category (where they spent most; ties by name).

    Returns ``[{"user_id": 7, "spent": Decimal("812.40"), "favourite": "books"}, ...]``.
    Correct, and slow: profile it to see why.
    """
    with engine.connect() as conn:
        rows = user_items(conn, user_ids)
        per_user: dict[int, dict[str, Decimal]] = {}
        for user_id, product_id, quantity, unit_price in rows:
            category = lookup_category(conn, product_id)
            spent = per_user.setdefault(user_id, {})
            spent[category] = spent.get(category, Decimal(0)) + quantity * as_money(unit_price)
    return [
        {"user_id": user_id, "spent": sum(spent.values(), Decimal(0)), "favourite": favourite_category(spent)}
        for user_id, spent in sorted(per_user.items())
    ]
