"""Chapter 05 helpers: caching with a real Redis, measured by hits, misses and database calls.

What is here, in the order of the chapter:

* :class:`CountingRedis` - a redis-py client that counts the commands it sends (``KEYS`` against
  ``SCAN``, how many ``DEL`` batches, ...), pipelines included.
* Keys: :func:`cache_key`, :func:`record_key` (id + version, Rails' ``cache_key_with_version``),
  :func:`search_key` (a digest, so user input never makes unbounded keys).
* Cache-aside: :func:`cached` (the plain function) and :class:`Cache` (with statistics, a key
  namespace, and degradation to the database when Redis is slow or down).
* Workloads: :func:`zipf_workload`, LRU and TTL hit-rate simulations.
* The expensive read: :func:`product_page` (3 queries); :func:`run_counting_queries` adds the
  queries each case of a :class:`~perfcourse.timing.Benchmark` sent to its table.
* Invalidation on ORM events: :func:`invalidate_on_change`, :func:`stale_reads`.
* Fragment and Russian-doll caching of Jinja2 templates: :class:`FragmentCache`,
  :func:`render_user_orders`, :func:`change_item`.
* Pattern deletes (:func:`delete_pattern` with SCAN, :func:`fill_keys`); the harnesses that run
  the notebook's code: :func:`counter_race` (its increment, in threads), :func:`stampede` (its
  fetch, in threads), :func:`xfetch_recomputes` (its early-refresh rule, on a simulated clock);
  client timeouts (:func:`resilient_client`, :func:`degraded_pages`).
* HTTP caching: :func:`create_app` (ETag and Last-Modified from the caller's validator, 304,
  fingerprinted assets), :func:`conditional_requests`, :func:`revisit_after_change` (served by
  :class:`perfcourse.web.BackgroundServer`).

* The lab's harness: :class:`PageRequest` and :func:`page_requests` (a Zipf stream of product
  page requests with currencies, tracking parameters and sessions), :class:`PageRenderer` (the
  page in a currency, renders counted), :func:`replay_pages` (the notebook's cache, counted),
  :func:`price_change_trial` (prices changed through the ORM with the notebook's listeners and a
  reader between flush and commit) and :func:`hot_key_trial` (the notebook's fetch of a hot key
  on a simulated clock, threads released together, recomputations counted).

Every key written here lives under a namespace the caller gives (the notebook uses ``ch05``, tests
a unique prefix); nothing is ever flushed globally. Counts are deterministic for a given workload:
the random ones are seeded, the concurrent ones are sequenced with barriers and events.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import jinja2
import markupsafe
import numpy as np
import pandas as pd
import redis
import sqlalchemy as sa
from flask import Flask, abort, jsonify, request
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .. import services, web
from ..models import Product
from ..proxy import redis_via_proxy
from ..statements import count_queries
from ..timing import Benchmark
from ..units import format_duration

__all__ = [
    "DEFAULT_ASSETS",
    "IMMUTABLE",
    "ITEM_TEMPLATE",
    "MAX_PART",
    "NAMESPACE",
    "ORDER_TEMPLATE",
    "PAGE_TEMPLATE",
    "PRODUCT_PAGE_QUERIES",
    "REVALIDATE",
    "add_versions",
    "asset_headers",
    "Cache",
    "cache_key",
    "CURRENCIES",
    "cached",
    "CacheStats",
    "change_item",
    "conditional_requests",
    "counter_race",
    "CountingRedis",
    "create_app",
    "degraded_pages",
    "delete_namespace",
    "delete_pattern",
    "digest",
    "fill_keys",
    "fingerprint",
    "FragmentCache",
    "hit_rates_by_size",
    "hit_rates_by_ttl",
    "hot_key_trial",
    "invalidate_on_change",
    "lru_hits",
    "page_requests",
    "PageRenderer",
    "PageRequest",
    "price_change_trial",
    "price_in",
    "product_key",
    "product_page",
    "read_product",
    "record_key",
    "render_user_orders",
    "replay_pages",
    "resilient_client",
    "resilient_kwargs",
    "retry_policy",
    "revisit_after_change",
    "run_counting_queries",
    "russian_doll_steps",
    "search_key",
    "stale_reads",
    "stampede",
    "ttl_hits",
    "Validator",
    "xfetch_recomputes",
    "zipf_workload",
]

NAMESPACE = "ch05"

# ---------------------------------------------------------------------------------------------
# A client that counts what it sends
# ---------------------------------------------------------------------------------------------


class _CountingPipeline(redis.client.Pipeline):
    def __init__(self, owner: CountingRedis, *args) -> None:
        super().__init__(*args)
        self._owner = owner

    def pipeline_execute_command(self, *args, **options):
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        with self._owner._lock:
            self._owner.pipelined[name.upper()] += 1
        return super().pipeline_execute_command(*args, **options)

    def execute(self, raise_on_error: bool = True):
        if self.command_stack:
            self._owner._record(("PIPELINE",), 0.0)  # one round trip for the whole batch
        return super().execute(raise_on_error)

    def immediate_execute_command(self, *args, **options):
        self._owner._record(args, 0.0)
        return super().immediate_execute_command(*args, **options)


class CountingRedis(redis.Redis):
    """A redis-py client sharing ``source``'s connections that counts every command it sends.

    ``calls`` is a :class:`collections.Counter` of command names (``"SCAN"``, ``"DEL"``...),
    one per round trip: a pipeline counts once as ``"PIPELINE"`` and its queued commands go to
    ``pipelined``. ``durations`` maps each name to the seconds each call took; ``replies``
    records how many items list replies held (``KEYS`` returns every name at once, ``SCAN`` one
    batch). :meth:`reset` starts over.
    """

    def __init__(self, source: redis.Redis) -> None:
        super().__init__(connection_pool=source.connection_pool)
        self.calls: Counter[str] = Counter()
        self.pipelined: Counter[str] = Counter()
        self.durations: dict[str, list[float]] = {}
        self.replies: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def _record(self, args, seconds: float, reply: Any = None) -> None:
        name = str(args[0]).upper() if args else "?"
        if isinstance(args[0], bytes):
            name = args[0].decode().upper()
        with self._lock:
            self.calls[name] += 1
            self.durations.setdefault(name, []).append(seconds)
            if name == "SCAN" and isinstance(reply, (list, tuple)) and len(reply) == 2:
                self.replies.setdefault(name, []).append(len(reply[1]))
            elif isinstance(reply, (list, tuple)):
                self.replies.setdefault(name, []).append(len(reply))

    def execute_command(self, *args, **options):
        started = time.perf_counter()
        reply = super().execute_command(*args, **options)
        self._record(args, time.perf_counter() - started, reply)
        return reply

    def pipeline(self, transaction: bool = True, shard_hint=None):
        return _CountingPipeline(self, self.connection_pool, self.response_callbacks,
                                 transaction, shard_hint)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.pipelined.clear()
            self.durations.clear()
            self.replies.clear()

    def longest_call_s(self, name: str) -> float:
        return max(self.durations.get(name.upper(), [0.0]))


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

#: Longest key part kept as is; longer parts (and anything with spaces) become a digest.
MAX_PART = 64
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.\-/=@]+$")


def digest(text: str, length: int = 16) -> str:
    """A short, stable hex digest of ``text`` (SHA-256): bounded key parts from any input."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def cache_key(*parts: Any, namespace: str = NAMESPACE) -> str:
    """``namespace:part:part...``: a readable key of bounded length.

    Parts are turned into text; a part that is long or holds characters unsafe in a key (spaces,
    colons, control characters: typically user input) is replaced by its :func:`digest`, so
    the key space stays bounded and a key never collides with another namespace's.
    """
    if not parts:
        raise ValueError("A cache key needs at least one part after the namespace.")
    cleaned = []
    for part in parts:
        text = str(part)
        if not text:
            raise ValueError("Empty key part: a key made of blanks collides with other keys.")
        cleaned.append(text if len(text) <= MAX_PART and _SAFE_PART.match(text) else digest(text))
    return ":".join([namespace, *cleaned])


def record_key(table: str, record_id: Any, version: Any, *, namespace: str = NAMESPACE) -> str:
    """Key of one record's cached form: ``ns:table/id-vVERSION`` (Rails ``cache_key_with_version``).

    A new version (``updated_at`` or a version counter) is a new key: the old entry is never read
    again and simply expires. No delete needed, hence "key-based expiry".
    """
    if isinstance(version, datetime):
        version = version.strftime("%Y%m%d%H%M%S%f")
    return cache_key(f"{table}/{record_id}-v{version}", namespace=namespace)


def search_key(query: str, *, namespace: str = NAMESPACE) -> str:
    """Key of a search result: the normalised query text as a digest (bounded, safe)."""
    normalised = " ".join(query.lower().split())
    return cache_key("search", digest(normalised), namespace=namespace)


# ---------------------------------------------------------------------------------------------
# Cache-aside
# ---------------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    def default(obj):
        if isinstance(obj, Decimal):
            return str(obj)
        if isinstance(obj, datetime):
            return obj.isoformat()
        raise TypeError(f"Cannot cache a {type(obj).__name__} as JSON")

    return json.dumps(value, default=default, separators=(",", ":"))


def cached(client: redis.Redis, key: str, ttl_s: float, compute: Callable[[], Any]) -> Any:
    """Cache-aside in four lines: read the key; on a miss compute, store with a TTL, return.

    Values are stored as JSON. A cached falsy value (``0``, ``[]``, ``""``) is a hit: test
    ``is not None``, never truthiness.
    """
    raw = client.get(key)
    if raw is not None:
        return json.loads(raw)
    value = compute()
    client.set(key, _dumps(value), px=max(1, int(ttl_s * 1000)))
    return value


@dataclass
class CacheStats:
    """What a :class:`Cache` did: hits, misses, computations, and Redis errors survived."""

    hits: int = 0
    misses: int = 0
    computes: int = 0
    errors: int = 0

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0

    def as_row(self) -> dict[str, int]:
        return asdict(self)


class Cache:
    """Cache-aside on Redis with a key namespace, a default TTL, statistics, and degradation.

    ``fetch(key, compute, ttl_s)`` reads ``namespace:key``; on a miss it computes and stores the
    value with the TTL. When Redis fails (timeout, connection refused) the value is computed from
    the database and the error only counted: a dead cache makes pages slower, never broken.
    """

    def __init__(self, client: redis.Redis, namespace: str = NAMESPACE, *,
                 ttl_s: float = 300.0) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def key(self, *parts: Any) -> str:
        return cache_key(*parts, namespace=self.namespace)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def fetch(self, key: str, compute: Callable[[], Any], ttl_s: float | None = None) -> Any:
        """The cached value of ``key`` (a full key or parts joined under the namespace)."""
        full = key if key.startswith(self.namespace + ":") else self.key(key)
        try:
            raw = self.client.get(full)
        except redis.RedisError:
            self._count("errors")
            self._count("computes")
            return compute()  # the cache is sick: serve from the database, do not write to it
        if raw is not None:
            self._count("hits")
            return json.loads(raw)
        self._count("misses")
        value = compute()
        self._count("computes")
        try:
            self.client.set(full, _dumps(value), px=max(1, int((ttl_s or self.ttl_s) * 1000)))
        except redis.RedisError:
            self._count("errors")
        return value

    def delete(self, *keys: str) -> int:
        full = [k if k.startswith(self.namespace + ":") else self.key(k) for k in keys]
        try:
            return self.client.delete(*full) if full else 0
        except redis.RedisError:
            self._count("errors")
            return 0

    def clear(self) -> int:
        """Delete every key of the namespace (SCAN + DEL, see :func:`delete_pattern`)."""
        return delete_pattern(self.client, self.namespace + ":*")


# ---------------------------------------------------------------------------------------------
# Pattern deletes: KEYS against SCAN
# ---------------------------------------------------------------------------------------------


def delete_pattern(client: redis.Redis, pattern: str, *, count: int = 500) -> int:
    """Delete the keys matching ``pattern`` with ``SCAN`` (batches of ``count``); return how many.

    SCAN walks the keyspace a slice per call, so the server keeps answering other clients in
    between; matching keys are deleted one ``DEL`` per batch as they come.
    """
    deleted, batch = 0, []
    for key in client.scan_iter(match=pattern, count=count):
        batch.append(key)
        if len(batch) >= count:
            deleted += client.delete(*batch)
            batch = []
    if batch:
        deleted += client.delete(*batch)
    return deleted


def fill_keys(client: redis.Redis, prefix: str, n: int, *, ttl_s: float = 600) -> None:
    """Write ``n`` small keys ``prefix0..`` in pipelined batches (each with a TTL, as a safety)."""
    for start in range(0, n, 1000):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 1000)):
                pipe.set(f"{prefix}{i}", "x", ex=int(ttl_s))
            pipe.execute()


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------


def counter_race(client: redis.Redis, key: str, increment: Callable[..., Any], *, workers: int = 4,
                 rounds: int = 50) -> dict[str, Any]:
    """``workers`` threads each call ``increment(client, key, pause)`` once per round, ``rounds``
    times, on the counter ``key``; count what was lost.

    ``increment`` is the code under test (the notebook's). ``pause()`` is the harness's way of
    forcing the unlucky interleaving that production hits by chance: a barrier that returns once
    every worker has reached it, so a read-modify-write that calls it between its read and its
    write reads the same value as every other worker. An ``increment`` that never calls it
    (``INCR``) passes the barrier after its work. Deterministic. Returns the case
    (``increment``'s docstring), ``expected``, ``counted`` and ``lost`` increments.
    """
    client.delete(key)
    start, middle = threading.Barrier(workers), threading.Barrier(workers)
    errors: list[BaseException] = []
    paused = threading.local()

    def pause() -> None:
        paused.done = True
        middle.wait(timeout=10)

    def work() -> None:
        try:
            for _ in range(rounds):
                start.wait(timeout=10)
                paused.done = False
                increment(client, key, pause)
                if not paused.done:
                    middle.wait(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
            start.abort()
            middle.abort()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    counted = int(client.get(key) or 0)
    client.delete(key)
    expected = workers * rounds
    label = (increment.__doc__ or increment.__name__).strip().splitlines()[0]
    return {"case": label, "workers": workers, "rounds": rounds,
            "expected": expected, "counted": counted, "lost": expected - counted}


# ---------------------------------------------------------------------------------------------
# Workloads and hit rates
# ---------------------------------------------------------------------------------------------


def zipf_workload(requests: int, items: int, *, s: float = 1.0, seed: int = 5) -> list[int]:
    """``requests`` ids in ``1..items`` drawn from a Zipf-like law: rank k has weight 1/k^s.

    The ranks are shuffled over the ids (the most popular product is not id 1). Seeded: the same
    arguments give the same list on every machine.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** s
    weights /= weights.sum()
    ids = rng.permutation(items) + 1
    return [int(i) for i in ids[rng.choice(items, size=requests, p=weights)]]


def lru_hits(workload: Iterable[Any], capacity: int) -> tuple[int, int]:
    """(hits, misses) of an LRU cache holding ``capacity`` entries over ``workload``."""
    cache: OrderedDict[Any, None] = OrderedDict()
    hits = misses = 0
    for key in workload:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            misses += 1
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits, misses


def hit_rates_by_size(workload: Sequence[Any], capacities: Iterable[int]) -> pd.DataFrame:
    """One row per cache size: ``capacity, hits, misses, hit_rate`` (LRU eviction)."""
    rows = []
    for capacity in capacities:
        hits, misses = lru_hits(workload, capacity)
        rows.append({"capacity": capacity, "hits": hits, "misses": misses,
                     "hit_rate": round(hits / len(workload), 4)})
    return pd.DataFrame(rows)


def ttl_hits(workload: Iterable[Any], ttl_s: float, rate_per_s: float) -> tuple[int, int]:
    """(hits, misses) of an unbounded cache whose entries live ``ttl_s``, requests arriving
    evenly at ``rate_per_s`` (a simulated clock: deterministic)."""
    expires: dict[Any, float] = {}
    hits = misses = 0
    for i, key in enumerate(workload):
        now = i / rate_per_s
        if expires.get(key, -1.0) > now:
            hits += 1
        else:
            misses += 1
            expires[key] = now + ttl_s
    return hits, misses


def hit_rates_by_ttl(workload: Sequence[Any], ttls_s: Iterable[float],
                     rate_per_s: float) -> pd.DataFrame:
    """One row per TTL: ``ttl_s, hits, misses, hit_rate``."""
    rows = []
    for ttl in ttls_s:
        hits, misses = ttl_hits(workload, ttl, rate_per_s)
        rows.append({"ttl_s": ttl, "hits": hits, "misses": misses,
                     "hit_rate": round(hits / len(workload), 4)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The expensive read: a product page
# ---------------------------------------------------------------------------------------------

#: Queries one uncached product page sends.
PRODUCT_PAGE_QUERIES = 3


def product_page(engine: Engine, product_id: int) -> dict[str, Any]:
    """What a product page shows, in 3 queries: the product, its category, its sales figures."""
    with engine.connect() as conn:
        product = conn.execute(sa.text(
            "SELECT id, name, price, category_id FROM products WHERE id = :id"),
            {"id": product_id}).one()
        category = conn.execute(sa.text("SELECT name FROM categories WHERE id = :id"),
                                {"id": product.category_id}).scalar_one()
        sold = conn.execute(sa.text(
            "SELECT count(*), coalesce(sum(quantity), 0) FROM order_items "
            "WHERE product_id = :id"), {"id": product_id}).one()
    return {"id": product.id, "name": product.name, "price": str(product.price),
            "category": category, "orders": int(sold[0]), "units": int(sold[1])}


def run_counting_queries(bench: Benchmark, engine: Engine, **kwargs: Any) -> pd.DataFrame:
    """``bench.run(**kwargs)`` with a ``db_queries`` column: the statements each case sent to
    ``engine`` per run (setups excluded). The cases are restored afterwards."""
    sent: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    originals = [(case, case.fn) for case in bench.cases]

    def counting(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def run(**case_kwargs: Any) -> Any:
            with count_queries(engine) as queries:
                result = fn(**case_kwargs)
            sent[label] += queries.count
            runs[label] += 1
            return result
        return run

    for case, fn in originals:
        case.fn = counting(fn, case.label)
    try:
        table = bench.run(**kwargs)
    finally:
        for case, fn in originals:
            case.fn = fn
    table["db_queries"] = [sent[label] // max(1, runs[label]) for label in table.case]
    return table


# ---------------------------------------------------------------------------------------------
# Invalidation on ORM events
# ---------------------------------------------------------------------------------------------


def product_key(cache: Cache, product_id: int) -> str:
    return cache.key("product", product_id)


def read_product(session: Session, cache: Cache, product_id: int) -> dict[str, Any]:
    """A product's name and price through the cache (one query on a miss)."""
    def load():
        product = session.get(Product, product_id)
        return {"id": product.id, "name": product.name, "price": str(product.price)}

    return cache.fetch(product_key(cache, product_id), load)


@contextlib.contextmanager
def invalidate_on_change(cache: Cache, *, after_commit: bool = True):
    """While active, a change to a :class:`~perfcourse.models.Product` deletes its cached entry.

    ``after_update``/``after_insert``/``after_delete`` mapper events note the key; with
    ``after_commit`` (default) the keys are deleted once the transaction has committed, so a
    reader between the flush and the commit cannot put the old row back into the cache. With
    ``after_commit=False`` they are deleted at once, during the flush (simpler, that race
    remains). Listeners are removed on exit.
    """
    pending_key = f"perfcourse.caching.invalidate.{id(cache)}"

    def on_change(mapper, connection, target):
        key = product_key(cache, target.id)
        if not after_commit:
            cache.delete(key)
            return
        session = sa.orm.object_session(target)
        if session is not None:
            session.info.setdefault(pending_key, set()).add(key)

    def on_commit(session):
        keys = session.info.pop(pending_key, set())
        if keys:
            cache.delete(*keys)

    def on_rollback(session):
        session.info.pop(pending_key, None)

    mapper_events = ("after_update", "after_insert", "after_delete")
    for name in mapper_events:
        sa.event.listen(Product, name, on_change)
    sa.event.listen(Session, "after_commit", on_commit)
    sa.event.listen(Session, "after_rollback", on_rollback)
    try:
        yield
    finally:
        for name in mapper_events:
            sa.event.remove(Product, name, on_change)
        sa.event.remove(Session, "after_commit", on_commit)
        sa.event.remove(Session, "after_rollback", on_rollback)


def stale_reads(engine: Engine, cache: Cache, product_ids: Sequence[int],
                changed: Sequence[int], *, hook: bool) -> dict[str, Any]:
    """Warm the cache for ``product_ids``, raise the price of ``changed`` through the ORM, read
    every product again and count the reads that differ from the database (stale).

    Prices are restored afterwards and the products' keys deleted.
    """
    cache.stats = CacheStats()
    with Session(engine) as session:
        for pid in product_ids:
            read_product(session, cache, pid)
    manager = invalidate_on_change(cache) if hook else contextlib.nullcontext()
    with manager, Session(engine) as session:
        originals = {}
        for pid in changed:
            product = session.get(Product, pid)
            originals[pid] = product.price
            product.price = product.price + Decimal("1.00")
        session.commit()
    stale = 0
    warm = CacheStats(**cache.stats.as_row())
    with Session(engine) as session:
        for pid in product_ids:
            shown = read_product(session, cache, pid)
            truth = session.get(Product, pid)
            stale += shown["price"] != str(truth.price)
    with Session(engine) as session:
        for pid, price in originals.items():
            session.get(Product, pid).price = price
        session.commit()
    cache.delete(*(product_key(cache, pid) for pid in product_ids))
    return {"invalidation": "after_commit hook" if hook else "none (TTL only)",
            "reads": len(product_ids), "updated": len(changed),
            "hits": cache.stats.hits - warm.hits, "misses": cache.stats.misses - warm.misses,
            "stale_reads": stale}


# ---------------------------------------------------------------------------------------------
# Fragment and Russian-doll caching
# ---------------------------------------------------------------------------------------------

ITEM_TEMPLATE = (
    '<li class="item">product {{ item.product_id }} × {{ item.quantity }} at '
    "{{ item.unit_price }}</li>"
)
ORDER_TEMPLATE = (
    '<section class="order"><h3>Order {{ order.id }} · {{ order.status }} · {{ order.total }}'
    "</h3><ul>{% for html in items %}{{ html }}{% endfor %}</ul></section>"
)
PAGE_TEMPLATE = (
    '<main><h2>Orders of user {{ user_id }}</h2>{% for html in orders %}{{ html }}'
    "{% endfor %}</main>"
)


def _environment():
    return jinja2.Environment(autoescape=True)


def add_versions(engine: Engine) -> None:
    """Add a ``version`` column (default 1) to ``orders`` and ``order_items`` of a scratch copy,
    and an ``updated_at`` to ``orders`` (starting as ``created_at``).

    The shop schema has neither; the versions play their part in the fragment keys, ``updated_at``
    in the HTTP validators. Idempotent. Never run this on the course dataset.
    """
    with engine.begin() as conn:
        for table in ("orders", "order_items"):
            columns = {c["name"] for c in sa.inspect(conn).get_columns(table)}
            if "version" not in columns:
                conn.exec_driver_sql(
                    f"ALTER TABLE {table} ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
        if "updated_at" not in {c["name"] for c in sa.inspect(conn).get_columns("orders")}:
            conn.exec_driver_sql("ALTER TABLE orders ADD COLUMN updated_at TIMESTAMP")
            conn.exec_driver_sql("UPDATE orders SET updated_at = created_at")


class FragmentCache:
    """Rendered HTML fragments in Redis, keyed by record id + version; counts renders per kind."""

    def __init__(self, client: redis.Redis, namespace: str = NAMESPACE, *,
                 ttl_s: float = 3600) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.renders: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.env = _environment()
        self.templates = {"item": self.env.from_string(ITEM_TEMPLATE),
                          "order": self.env.from_string(ORDER_TEMPLATE),
                          "page": self.env.from_string(PAGE_TEMPLATE)}

    def fetch(self, kind: str, key: str, render: Callable[[], str]) -> str:
        """The fragment under ``key``; rendered (and stored) only on a miss."""
        raw = self.client.get(key)
        if raw is not None:
            self.hits[kind] += 1
            return raw.decode() if isinstance(raw, bytes) else raw
        html = render()
        self.renders[kind] += 1
        self.client.set(key, html, px=int(self.ttl_s * 1000))
        return html

    def render(self, kind: str, **context) -> str:
        context = {k: ([markupsafe.Markup(h) for h in v] if k in ("items", "orders") else v)
                   for k, v in context.items()}
        return self.templates[kind].render(**context)

    def reset_counts(self) -> None:
        self.renders.clear()
        self.hits.clear()

    def clear(self) -> int:
        return delete_pattern(self.client, f"{self.namespace}:frag:*")


def render_user_orders(engine: Engine, fragments: FragmentCache, user_id: int) -> str:
    """The orders page of a user, as nested cached fragments (Russian doll).

    The page key holds the number of the user's orders and their highest version; each order's
    key its id and version; each item's key its id and version. A hit on an outer fragment skips
    everything inside it, database reads included.
    """
    ns = fragments.namespace
    with engine.connect() as conn:
        count, newest = conn.execute(sa.text(
            "SELECT count(*), coalesce(max(version), 0) FROM orders WHERE user_id = :u"),
            {"u": user_id}).one()
        page_key = cache_key("frag", f"user-orders/{user_id}-{count}-v{newest}", namespace=ns)

        def render_page() -> str:
            orders = conn.execute(sa.text(
                "SELECT id, status, total, version FROM orders WHERE user_id = :u ORDER BY id"),
                {"u": user_id}).all()
            parts = []
            for order in orders:
                def render_order(order=order) -> str:
                    items = conn.execute(sa.text(
                        "SELECT id, product_id, quantity, unit_price, version FROM order_items "
                        "WHERE order_id = :o ORDER BY id"), {"o": order.id}).all()
                    item_html = [
                        fragments.fetch(
                            "item", cache_key("frag", f"order_items/{item.id}-v{item.version}",
                                              namespace=ns),
                            lambda item=item: fragments.render("item", item=item))
                        for item in items]
                    return fragments.render("order", order=order, items=item_html)

                parts.append(fragments.fetch(
                    "order", cache_key("frag", f"orders/{order.id}-v{order.version}", namespace=ns),
                    render_order))
            return fragments.render("page", user_id=user_id, orders=parts)

        return fragments.fetch("page", page_key, render_page)


def change_item(engine: Engine, item_id: int, quantity: int, *, touch: bool = True) -> None:
    """Set an order item's quantity and bump its version; with ``touch`` bump its order's too
    (Rails ``belongs_to :order, touch: true``), so every enclosing fragment gets a new key."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE order_items SET quantity = :q, version = version + 1 "
                             "WHERE id = :i"), {"q": quantity, "i": item_id})
        if touch:
            conn.execute(sa.text(
                "UPDATE orders SET version = version + 1 WHERE id = "
                "(SELECT order_id FROM order_items WHERE id = :i)"), {"i": item_id})


def russian_doll_steps(engine: Engine, fragments: FragmentCache, user_id: int) -> pd.DataFrame:
    """Render a user's orders page through a sequence of steps; one row of counts per step.

    Steps: cold cache; warm; one item changed with touch; another changed without touch.
    ``stale`` says whether the page shows a quantity other than the database's.
    """

    with engine.connect() as conn:
        items = conn.execute(sa.text(
            "SELECT order_items.id, quantity FROM order_items JOIN orders ON orders.id = "
            "order_items.order_id WHERE orders.user_id = :u ORDER BY order_items.id"),
            {"u": user_id}).all()
        total_items = len(items)
        total_orders = conn.execute(sa.text("SELECT count(*) FROM orders WHERE user_id = :u"),
                                    {"u": user_id}).scalar_one()
    first, last = items[0], items[-1]
    steps = [("cold cache", None), ("warm cache", None),
             ("item changed, order touched", (first.id, first.quantity + 7, True)),
             ("item changed, order not touched", (last.id, last.quantity + 9, False))]
    rows = []
    for label, change in steps:
        if change:
            change_item(engine, change[0], change[1], touch=change[2])
        fragments.reset_counts()
        with count_queries(engine) as queries:
            html = render_user_orders(engine, fragments, user_id)
        with engine.connect() as conn:
            wanted = conn.execute(sa.text(
                "SELECT product_id, quantity FROM order_items JOIN orders ON orders.id = "
                "order_items.order_id WHERE orders.user_id = :u"), {"u": user_id}).all()
        stale = any(f"product {p} × {q} " not in html for p, q in wanted)
        rows.append({"step": label, "page_renders": fragments.renders["page"],
                     "order_renders": fragments.renders["order"],
                     "item_renders": fragments.renders["item"], "queries": queries.count,
                     "stale": stale})
    for item in (first, last):  # leave the scratch data as found (versions aside)
        change_item(engine, item.id, item.quantity, touch=True)
    df = pd.DataFrame(rows)
    df.attrs.update(orders=total_orders, items=total_items)
    return df


# ---------------------------------------------------------------------------------------------
# Stampede protection
# ---------------------------------------------------------------------------------------------


class _WatchedClient:
    """``client`` as seen by one request of :func:`stampede`: each ``GET`` is reported."""

    def __init__(self, client: redis.Redis, on_get: Callable[[], None]) -> None:
        self._client = client
        self._on_get = on_get

    def get(self, name):
        value = self._client.get(name)
        self._on_get()
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def stampede(client: redis.Redis, key: str, fetch: Callable[..., Any], *, threads: int = 8,
             compute_s: float = 0.02) -> dict[str, Any]:
    """``threads`` requests call ``fetch(client, key, compute)`` at once on a missing ``key``;
    count the recomputations.

    ``fetch`` is the code under test (the notebook's): it reads ``key`` and on a miss may call
    ``compute()``, the expensive result (``compute_s`` long, returns a string). The harness only
    makes the worst case repeatable: the requests start together (a barrier) and ``compute``
    begins once every request has made its first ``GET``, so all of them have missed. Returns
    the case (``fetch``'s docstring), ``requests``, ``recomputations`` and ``served`` (requests
    that got a value). The key and ``key:lock`` are deleted before and after.
    """
    client.delete(key, key + ":lock")
    start = threading.Barrier(threads)
    first_reads = threading.Condition()
    readers: set[int] = set()
    computes = Counter()
    served: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def saw_get() -> None:
        with first_reads:
            readers.add(threading.get_ident())
            first_reads.notify_all()

    def compute() -> str:
        with first_reads:  # the worst moment: every request has read the key and missed
            if not first_reads.wait_for(lambda: len(readers) >= threads, timeout=10):
                raise TimeoutError("stampede: a request never read the key (does fetch GET it?)")
        time.sleep(compute_s)
        with lock:
            computes["n"] += 1
        return "expensive result"

    def request() -> None:
        try:
            start.wait(timeout=10)
            value = fetch(_WatchedClient(client, saw_get), key, compute)
            with lock:
                served.append(value)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    workers = [threading.Thread(target=request, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    client.delete(key, key + ":lock")
    if errors:
        raise errors[0]
    label = (fetch.__doc__ or fetch.__name__).strip().splitlines()[0]
    return {"case": label, "requests": threads, "recomputations": computes["n"],
            "served": sum(v is not None for v in served)}


def xfetch_recomputes(refresh_early: Callable[[float, float, np.random.Generator], bool], *,
                      requests_per_s: float = 50, ttl_s: float = 60, window_s: float = 10,
                      seed: int = 7) -> pd.DataFrame:
    """Replay the last ``window_s`` seconds before a key's expiry at ``requests_per_s``, asking
    ``refresh_early(now, expiry, rng)`` (the notebook's rule, e.g. XFetch) for every request.

    A simulated clock and a seeded generator: the same rule gives the same table on every
    machine. Rows: seconds before expiry (bucketed by second, from ``window_s`` down to 1),
    requests, and how many would recompute early; the first one refreshes the entry, so only it
    counts in practice: ``table.attrs["first_refresh_before_expiry_s"]`` says when it came.
    """
    rng = np.random.default_rng(seed)
    expiry = ttl_s
    steps = int(round(window_s * requests_per_s))
    before = (steps - np.arange(steps)) / requests_per_s  # seconds left, window_s down to > 0
    early = np.array([bool(refresh_early(float(expiry - left), float(expiry), rng)) for left in before])
    buckets = np.ceil(before - 1e-9).astype(int)
    df = pd.DataFrame({"seconds_before_expiry": buckets, "early": early})
    table = df.groupby("seconds_before_expiry", sort=False).agg(
        requests=("early", "size"), would_recompute=("early", "sum")).reset_index()
    table.attrs["first_refresh_before_expiry_s"] = (
        float(before[early.argmax()]) if early.any() else float("nan"))
    return table.sort_values("seconds_before_expiry", ascending=False, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Timeouts, retries, degradation
# ---------------------------------------------------------------------------------------------


def retry_policy(retries: int = 1, *, base_s: float = 0.01, cap_s: float = 0.05):
    """redis-py's retry object: ``retries`` more attempts with exponential backoff."""

    return Retry(ExponentialBackoff(cap=cap_s, base=base_s), retries)


def resilient_kwargs(*, socket_timeout_s: float = 0.05, retries: int = 1) -> dict[str, Any]:
    """Client settings for a cache: short timeouts, a retry on connection errors and timeouts."""
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry": retry_policy(retries),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }


def resilient_client(url: str | None = None, **settings) -> redis.Redis:
    """A client of the course's Redis with :func:`resilient_kwargs` (no ping: it may be down)."""

    return redis.Redis.from_url(url or services.redis_url(), **resilient_kwargs(**settings))


def degraded_pages(engine: Engine, product_ids: Sequence[int], *, namespace: str,
                   socket_timeout_s: float = 0.05, retries: int = 1,
                   slow_delay_s: float = 0.25) -> pd.DataFrame:
    """Serve the same product pages with a healthy cache, a cache slower than the client's
    timeout, and a cache that is gone (its proxy stopped). One row per scenario: pages served,
    cache hits, misses, errors survived, database queries and total time."""

    client, proxy = redis_via_proxy(0.0, **resilient_kwargs(socket_timeout_s=socket_timeout_s,
                                                             retries=retries))
    cache = Cache(client, namespace)
    rows = []
    try:
        for pid in product_ids:  # warm the cache: every scenario below could hit
            cache.fetch(cache.key("product", pid), lambda pid=pid: product_page(engine, pid))
        for scenario in ("healthy", f"slower than the {format_duration(socket_timeout_s)} "
                         "timeout", "down (proxy stopped)"):
            if scenario.startswith("slower"):
                proxy.delay_s = slow_delay_s
            if scenario.startswith("down"):
                proxy.delay_s = 0.0
                proxy.stop()
            cache.stats = CacheStats()
            pages = 0
            with count_queries(engine) as queries:
                started = time.perf_counter()
                for pid in product_ids:
                    page = cache.fetch(cache.key("product", pid),
                                       lambda pid=pid: product_page(engine, pid))
                    pages += page["id"] == pid
                total = time.perf_counter() - started
            rows.append({"cache": scenario, "pages": pages, "hits": cache.stats.hits,
                         "errors": cache.stats.errors, "db_queries": queries.count,
                         "total_s": total})
    finally:
        proxy.stop()
        cleanup = redis.Redis.from_url(services.redis_url())
        delete_pattern(cleanup, f"{namespace}:product:*")
        cleanup.close()
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# HTTP caching: a small Flask app, a real server, conditional requests
# ---------------------------------------------------------------------------------------------

#: Far-future caching for fingerprinted assets: the name changes whenever the content does.
IMMUTABLE = "public, max-age=31536000, immutable"
#: Revalidate every time (cheap with a 304) for URLs whose content can change.
REVALIDATE = "no-cache"

DEFAULT_ASSETS = {
    "app.css": b"body { font-family: sans-serif; }\n.order { margin: 1em 0; }\n" * 40,
    "app.js": b"document.addEventListener('DOMContentLoaded', () => {});\n" * 40,
}


def fingerprint(name: str, content: bytes, length: int = 8) -> str:
    """``app.css`` -> ``app.e2f2b650.css``: a digest of the content in the file name."""
    stem, dot, ext = name.rpartition(".")
    tag = hashlib.sha256(content).hexdigest()[:length]
    return f"{stem}.{tag}.{ext}" if dot else f"{name}.{tag}"


#: ``validator(conn, user_id) -> (etag, last_modified)``: what :func:`create_app` asks before loading.
Validator = Callable[[Any, int], tuple[str, Any]]


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


def create_app(engine: Engine, assets: dict[str, bytes] | None = None, *,
               validator: Validator | None = None):
    """A small Flask shop API with HTTP caching.

    * ``GET /users/<id>/orders``: the user's orders as JSON. With a ``validator`` (the caller's
      code: a cheap query giving an ETag and a ``Last-Modified`` time), a request whose
      ``If-None-Match``/``If-Modified-Since`` still matches gets ``304 Not Modified`` before the
      orders are even loaded (Rails ``stale?``/``fresh_when``); the validator must change with
      every write the response shows. Without one, the ETag is a digest of the body (always
      right, but the orders are loaded for every request; Rack::ETag does this).
    * ``GET /assets/<name>``: static files. A fingerprinted name (``app.e2f2b650.css``) is served
      with ``Cache-Control: public, max-age=31536000, immutable``; the plain name with
      ``no-cache`` and an ETag. ``app.config["ASSET_URLS"]`` maps plain names to fingerprinted.

    ``app.config["COUNTS"]`` counts ``orders loaded`` and ``orders 304`` and asset requests.
    """

    assets = dict(DEFAULT_ASSETS if assets is None else assets)
    by_fingerprint = {fingerprint(n, c): n for n, c in assets.items()}
    app = Flask("perfcourse_ch05")
    app.config["ASSET_URLS"] = {n: f"/assets/{fingerprint(n, c)}" for n, c in assets.items()}
    counts: Counter[str] = Counter()
    app.config["COUNTS"] = counts

    def still_fresh(etag: str, modified: datetime | None) -> bool:
        if request.if_none_match:
            return request.if_none_match.contains(etag)
        since = request.if_modified_since
        # HTTP dates have whole seconds: a change within the same second is not seen
        return bool(since and modified
                    and modified.replace(microsecond=0) <= since.replace(tzinfo=None))

    @app.get("/users/<int:user_id>/orders")
    def user_orders(user_id: int):
        etag = modified = None
        with engine.connect() as conn:
            if validator is not None:
                etag, modified = validator(conn, user_id)
                modified = _as_datetime(modified)
            if etag is not None and still_fresh(etag, modified):
                response = app.response_class(status=304)
            else:
                rows = conn.execute(sa.text(
                    "SELECT id, status, total, created_at FROM orders WHERE user_id = :u "
                    "ORDER BY id"), {"u": user_id}).all()
                if not rows:
                    abort(404)
                counts["orders loaded"] += 1
                response = jsonify([{"id": r.id, "status": r.status, "total": str(r.total),
                                     "created_at": str(r.created_at)} for r in rows])
        if etag is None:
            response.add_etag()  # a digest of the body
            response = response.make_conditional(request)
        else:
            response.set_etag(etag)
            if modified is not None:
                response.last_modified = modified
        if response.status_code == 304:
            counts["orders 304"] += 1
        response.headers["Cache-Control"] = "private, " + REVALIDATE
        return response

    @app.get("/assets/<name>")
    def asset(name: str):
        if name in by_fingerprint:
            response = app.response_class(assets[by_fingerprint[name]], mimetype=_mimetype(name))
            response.headers["Cache-Control"] = IMMUTABLE
            counts["asset fingerprinted"] += 1
            return response
        if name not in assets:
            abort(404)
        response = app.response_class(assets[name], mimetype=_mimetype(name))
        response.add_etag()
        response.headers["Cache-Control"] = REVALIDATE
        counts["asset plain"] += 1
        return response.make_conditional(request)

    return app


def _mimetype(name: str) -> str:
    return {"css": "text/css", "js": "text/javascript"}.get(name.rpartition(".")[2],
                                                            "application/octet-stream")


def conditional_requests(base_url: str, paths: Sequence[str], *, revisits: int = 3,
                         validator: str = "etag") -> pd.DataFrame:
    """Each path fetched once, then ``revisits`` times with ``If-None-Match`` (``validator=
    "etag"``) or ``If-Modified-Since`` (``"last-modified"``) from the first answer.

    One row per kind of request: ``requests``, ``status_200``, ``status_304``, ``body_bytes``,
    and for revisits the ``bytes_saved`` against sending the full body again.
    """
    first_bytes, first_headers = {}, {}
    rows = {"first visit": Counter(), "revisit": Counter()}
    for path in paths:
        result = web.get(base_url, path)
        first_bytes[path], first_headers[path] = result.body_bytes, result.headers
        rows["first visit"].update(requests=1, **{f"status_{result.status}": 1},
                                   body_bytes=result.body_bytes)
    for _ in range(revisits):
        for path in paths:
            if validator == "etag":
                headers = {"If-None-Match": first_headers[path]["ETag"]}
            else:
                headers = {"If-Modified-Since": first_headers[path]["Last-Modified"]}
            result = web.get(base_url, path, headers)
            saved = first_bytes[path] - result.body_bytes
            rows["revisit"].update(requests=1, **{f"status_{result.status}": 1},
                                   body_bytes=result.body_bytes, bytes_saved=saved)
    table = pd.DataFrame([{"request": name, **counts} for name, counts in rows.items()])
    for column in ("status_200", "status_304", "bytes_saved"):
        if column not in table:
            table[column] = 0
    table = table.fillna(0)
    columns = ["request", "requests", "status_200", "status_304", "body_bytes", "bytes_saved"]
    return table[columns].astype({c: int for c in columns[1:]})


def revisit_after_change(base_url: str, path: str, change: Callable[[], Any]) -> dict[str, Any]:
    """Fetch ``path``, run ``change()``, revisit with ``If-None-Match`` from the first answer.

    Returns ``status`` of the revisit, ``etag_changed``, and ``stale``: whether what the client
    now holds (its old copy after a 304, else the new body) differs from a fresh full response.
    """
    first = web.get(base_url, path)
    change()
    again = web.get(base_url, path, {"If-None-Match": first.headers["ETag"]})
    held = first.body if again.status == 304 else again.body
    truth = web.get(base_url, path).body
    return {"status": again.status, "etag_changed": again.headers.get("ETag") != first.headers["ETag"],
            "stale": held != truth}


def asset_headers(app, names: Iterable[str]) -> pd.DataFrame:
    """``Cache-Control`` (and status) of each asset URL, through Flask's test client."""
    client = app.test_client()
    rows = []
    for name in names:
        response = client.get(f"/assets/{name}")
        rows.append({"url": f"/assets/{name}", "status": response.status_code,
                     "cache_control": response.headers.get("Cache-Control", ""),
                     "etag": "yes" if response.headers.get("ETag") else "no"})
    return pd.DataFrame(rows)


def delete_namespace(client: redis.Redis, namespace: str = NAMESPACE) -> int:
    """Delete every key under ``namespace:`` (SCAN + DEL). The chapter's clean-up."""
    return delete_pattern(client, f"{namespace}:*")



# ---------------------------------------------------------------------------------------------
# The lab: a product page, its price, a hot key
# ---------------------------------------------------------------------------------------------

#: The currencies a product page is shown in, with the rate from the shop's euro prices.
CURRENCIES = {"EUR": Decimal("1"), "USD": Decimal("1.08"), "GBP": Decimal("0.85")}
_CURRENCY_WEIGHTS = (0.6, 0.3, 0.1)
_TRACKING = {"utm_source": ("newsletter", "google", "facebook", "partner", "instagram"),
             "utm_campaign": ("spring", "summer-sale", "retarget", "brand")}


@dataclass
class PageRequest:
    """One request for a product page, as the web framework hands it over.

    ``params`` holds every query parameter of the URL, tracking ones (``utm_source``, ``ref``)
    included; ``currency`` is the one that changes the page. ``session_id`` is the visitor's
    cookie. ``url`` rebuilds the URL the browser asked for.
    """

    product_id: int
    currency: str
    params: dict[str, str]
    session_id: str

    @property
    def url(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        return f"/products/{self.product_id}?{query}"


def page_requests(n: int, products: int, *, seed: int = 5, s: float = 1.1,
                  product_ids: Sequence[int] | None = None) -> list[PageRequest]:
    """``n`` product-page requests: Zipf-popular products (:func:`zipf_workload`), a currency per
    visitor (EUR, USD, GBP: 60/30/10%), tracking parameters on most links, a session per
    visitor, the parameters in the order each link happens to have. Seeded.

    ``product_ids`` maps ranks ``1..products`` to real ids (default: the ids themselves).
    """
    rng = np.random.default_rng(seed + 1)
    ids = list(product_ids) if product_ids is not None else list(range(1, products + 1))
    visitors = max(1, n // 4)
    currencies = rng.choice(list(CURRENCIES), size=visitors, p=_CURRENCY_WEIGHTS)
    out = []
    for pid in zipf_workload(n, len(ids), s=s, seed=seed):
        visitor = int(rng.integers(visitors))
        params = {"currency": str(currencies[visitor])}
        if rng.random() < 0.8:
            for name, values in _TRACKING.items():
                params[name] = str(values[int(rng.integers(len(values)))])
        if rng.random() < 0.5:
            params["ref"] = f"r{int(rng.integers(10**6)):06d}"
        order = list(params.items())
        rng.shuffle(order)
        out.append(PageRequest(int(ids[pid - 1]), str(currencies[visitor]), dict(order),
                               f"s{visitor:05d}-{int(rng.integers(10**4)):04d}"))
    return out


def price_in(price: Any, currency: str) -> str:
    """A euro price shown in ``currency``, rounded to the cent, as text."""
    return str((Decimal(str(price)) * CURRENCIES[currency]).quantize(Decimal("0.01")))


class PageRenderer:
    """The expensive part of a product page: :func:`product_page` (3 queries) in a currency.

    Call it as ``render(product_id, currency)``; ``renders`` counts the calls. ``truth(...)``
    gives the same page without counting (what the database says now).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.renders = 0
        self._lock = threading.Lock()

    def truth(self, product_id: int, currency: str) -> dict[str, Any]:
        page = product_page(self.engine, product_id)
        return {**page, "currency": currency, "price": price_in(page["price"], currency)}

    def __call__(self, product_id: int, currency: str) -> dict[str, Any]:
        with self._lock:
            self.renders += 1
        return self.truth(product_id, currency)


def replay_pages(fetch: Callable[[PageRequest, Callable[..., Any]], Any],
                 requests: Sequence[PageRequest], render: Callable[..., Any], *,
                 label: str | None = None) -> dict[str, Any]:
    """Serve ``requests`` through ``fetch(request, render)`` (the code under test); count renders.

    ``render`` is called by ``fetch`` on a miss; the renders counted here are those of this
    replay. A page whose ``id`` or ``currency`` differs from the request's is a wrong page.
    ``best_hit_rate`` is what a cache keyed by exactly what the page depends on reaches: every
    distinct (product, currency) page rendered once.
    """
    renders = Counter()

    def counting(product_id, currency):
        renders["n"] += 1
        return render(product_id, currency)

    wrong = 0
    for req in requests:
        page = fetch(req, counting)
        if not isinstance(page, dict) or (page.get("id"), page.get("currency")) != (
                req.product_id, req.currency):
            wrong += 1
    distinct = len({(r.product_id, r.currency) for r in requests})
    label = label or (getattr(fetch, "__doc__", None) or getattr(fetch, "__name__", "fetch"))
    return {"case": label.strip().splitlines()[0], "requests": len(requests),
            "distinct_pages": distinct, "renders": renders["n"],
            "hit_rate": round(1 - renders["n"] / len(requests), 4),
            "best_hit_rate": round(1 - distinct / len(requests), 4), "wrong_pages": wrong}


_MAPPER_EVENTS = frozenset({"before_insert", "after_insert", "before_update", "after_update",
                            "before_delete", "after_delete"})


def price_change_trial(engine: Engine, cache: Any, change: Callable[[Session], Any], *,
                       product_ids: Sequence[int], render: PageRenderer,
                       listeners: dict[str, Callable[..., Any]] | None = None) -> dict[str, Any]:
    """Warm the page of every product of ``product_ids`` in every currency through
    ``cache.fetch(request, render)``; run ``change(session)`` (updates through the ORM) in a
    session with ``listeners`` attached (mapper events on :class:`~perfcourse.models.Product`,
    session events on this trial's own Session class), then flush and commit. A concurrent reader
    fetches every page between the flush and the commit (right after the flush, and in
    ``before_commit`` after the listeners), as requests arriving meanwhile would. Finally every
    page is fetched again and compared with the database.

    Returns ``pages``, ``stale`` (pages showing another price or name than the database),
    ``stale_pages`` (a list of (product_id, currency)), ``recached_in_window`` (pages the reader
    had to render between the flush and the commit) and ``renders_after`` (renders of the final
    read). Listeners are removed on exit.
    """

    class TrialSession(Session):
        """This trial's sessions: listeners attached here touch no other session."""

    pages = [(pid, cur) for pid in product_ids for cur in CURRENCIES]

    def read_all() -> int:
        before = render.renders
        for pid, cur in pages:
            cache.fetch(PageRequest(pid, cur, {"currency": cur}, "trial"), render)
        return render.renders - before

    window = Counter()

    def reader(*_args) -> None:
        window["renders"] += read_all()

    attached = []
    try:
        read_all()
        for name, fn in (listeners or {}).items():
            target = Product if name in _MAPPER_EVENTS else TrialSession
            sa.event.listen(target, name, fn)
            attached.append((target, name, fn))
        sa.event.listen(TrialSession, "before_commit", reader)
        attached.append((TrialSession, "before_commit", reader))
        with TrialSession(engine) as session:
            change(session)
            session.flush()
            reader()
            session.commit()
    finally:
        for target, name, fn in attached:
            sa.event.remove(target, name, fn)
    before = render.renders
    stale = []
    for pid, cur in pages:
        shown = cache.fetch(PageRequest(pid, cur, {"currency": cur}, "trial"), render)
        truth = render.truth(pid, cur)
        if not isinstance(shown, dict) or (shown.get("price"), shown.get("name")) != (
                truth["price"], truth["name"]):
            stale.append((pid, cur))
    return {"pages": len(pages), "stale": len(stale), "stale_pages": stale,
            "recached_in_window": window["renders"], "renders_after": render.renders - before}


class _HotKeyClient:
    """``client`` as one request of :func:`hot_key_trial` sees it.

    After its first read of the lock key (``GET``/``EXISTS``) each request waits until every
    request has read it (or one is computing, or ``pause_s`` passed): a check-then-set on the
    lock then always meets the interleaving production meets by chance. ``SET`` on the lock without ``nx`` is noted.
    """

    def __init__(self, client: redis.Redis, lock_key: str, trial: dict[str, Any]) -> None:
        self._client = client
        self._lock_key = lock_key
        self._trial = trial

    def _pause_on_lock(self, names) -> None:
        names = {n.decode() if isinstance(n, bytes) else n for n in names}
        if self._lock_key not in names:
            return
        trial, me = self._trial, threading.get_ident()
        with trial["cond"]:
            if me in trial["lock_readers"]:
                return
            trial["lock_readers"].add(me)
            trial["cond"].notify_all()
            trial["cond"].wait_for(lambda: len(trial["lock_readers"]) >= trial["threads"]
                                   or trial["state"]["computing"] > 0, timeout=trial["pause_s"])

    def get(self, name):
        value = self._client.get(name)
        self._pause_on_lock([name])  # after the read: nobody sets the lock before all have read
        return value

    def exists(self, *names):
        found = self._client.exists(*names)
        self._pause_on_lock(names)
        return found

    def set(self, name, value, *args, **kwargs):
        if (name.decode() if isinstance(name, bytes) else name) == self._lock_key and not (
                kwargs.get("nx") or (len(args) > 2 and args[2])):
            self._trial["lock_set_without_nx"] += 1
        return self._client.set(name, value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def hot_key_trial(client: redis.Redis, key: str, fetch: Callable[..., Any], *, threads: int = 12,
                  fresh_s: float = 30.0, patience_s: float = 1.0) -> dict[str, Any]:
    """A hot key goes stale while ``threads`` requests arrive together; count what ``fetch`` does.

    ``fetch(client, key, compute, now, fresh_s)`` is the code under test; ``now`` is the trial's
    simulated clock (seconds), ``fresh_s`` how long a value stays fresh, and ``compute()`` the
    expensive value (a JSON-able dict, counted).
    The trial: one request at ``now = 0`` (cold), one at ``fresh_s / 2`` (should hit), then
    ``threads`` requests released together at ``now = fresh_s + 1``. A key whose Redis TTL would
    have run out by then is deleted first (Redis would have expired it); a lock read
    (``key + ":lock"``) is held until every request has read it. Each ``compute`` waits until
    every other request has returned or is computing too (at most ``patience_s``): requests
    that neither had were waiting for it. Then one more request at ``fresh_s + 2``.

    Returns ``recomputations`` (at the stale moment), ``served_old``/``served_new``, ``waited``,
    ``fresh_recomputes``, ``key_ttl_ms`` (after the first store), ``expired`` (deleted by the
    simulated clock), ``lock_ttl_ms`` (the lock's PTTL while computing; -2 none, -1 no expiry),
    ``lock_set_without_nx``, ``lock_left_ms`` (afterwards) and ``refreshed`` (the last request
    got the new value without computing). Keys ``key*`` are deleted before and after.
    """
    lock_key = key + ":lock"
    counts = Counter()
    lock_ttls: list[int] = []
    state = {"returned": 0, "computing": 0, "waited": None}
    cond = threading.Condition()
    trial: dict[str, Any] = {"cond": cond, "lock_readers": set(), "state": state,
                             "threads": threads, "pause_s": patience_s, "lock_set_without_nx": 0}

    def value(version: int) -> dict[str, Any]:
        return {"bestsellers": [version * 100 + i for i in range(5)], "version": version}

    def compute_value(version: int, phase: str) -> Callable[[], dict[str, Any]]:
        def compute() -> dict[str, Any]:
            with cond:
                counts[phase] += 1
            if phase == "stale":
                lock_ttls.append(int(client.pttl(lock_key)))
                with cond:
                    state["computing"] += 1
                    cond.notify_all()
                    done = cond.wait_for(
                        lambda: state["returned"] + state["computing"] >= threads,
                        timeout=patience_s)
                    if state["waited"] is None:
                        state["waited"] = 0 if done else (
                            threads - state["returned"] - state["computing"])
            return value(version)
        return compute

    def clean() -> None:
        delete_pattern(client, key.replace("*", r"\*") + "*")

    clean()
    errors: list[BaseException] = []
    served: list[Any] = []
    try:
        old = fetch(client, key, compute_value(1, "cold"), 0.0, fresh_s)
        key_ttl_ms = int(client.pttl(key))
        fetch(client, key, compute_value(1, "fresh"), fresh_s / 2, fresh_s)
        now = fresh_s + 1
        expired = 0 <= key_ttl_ms <= now * 1000
        if expired:
            client.delete(key)
        start = threading.Barrier(threads)
        compute = compute_value(2, "stale")

        def request() -> None:
            try:
                start.wait(timeout=10)
                served.append(fetch(_HotKeyClient(client, lock_key, trial), key, compute, now,
                                   fresh_s))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)
            finally:
                with cond:
                    state["returned"] += 1
                    cond.notify_all()

        workers = [threading.Thread(target=request, daemon=True) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        if errors:
            raise errors[0]
        lock_left_ms = int(client.pttl(lock_key))
        last = fetch(client, key, compute_value(2, "after"), now + 1, fresh_s)
    finally:
        clean()
    old_value, new_value = value(1), value(2)
    return {"requests": threads, "recomputations": counts["stale"],
            "served_old": sum(v == old_value for v in served),
            "served_new": sum(v == new_value for v in served),
            "served_other": sum(v != old_value and v != new_value for v in served),
            "waited": state["waited"] or 0, "first_value_ok": old == old_value,
            "fresh_recomputes": counts["fresh"], "key_ttl_ms": key_ttl_ms, "expired": expired,
            "lock_ttl_ms": lock_ttls[0] if lock_ttls else None,
            "lock_set_without_nx": trial["lock_set_without_nx"], "lock_left_ms": lock_left_ms,
            "refreshed": counts["after"] == 0 and last == new_value}
