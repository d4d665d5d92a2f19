"""Chapter 05 helpers: cache-aside, keys, pattern deletes, counters, stampedes, invalidation,
fragments, degradation and HTTP caching.

Redis tests use the ``redis_client`` fixture (embedded and configured servers, a unique key
prefix deleted afterwards); database tests run on a private copy of the ``tiny`` dataset (SQLite,
and PostgreSQL where the helper writes SQL of its own). Assertions are on counts, never on time.
"""

from __future__ import annotations

import json
import math
import time
from decimal import Decimal

import pytest
import redis

from perfcourse import db, web
from perfcourse.chapters import caching
from perfcourse.grading import check
from perfcourse.scratch import scratch_copy
from perfcourse.seed import seed_dataset


@pytest.fixture
def ns(redis_client):
    """The fixture's unique prefix as a namespace (``test_xxx``, keys ``test_xxx:...``)."""
    return redis_client.prefix.rstrip(":")


@pytest.fixture
def scratch(tiny, namespace):
    eng = scratch_copy(tiny, f"{namespace}_ch05")
    yield eng
    eng.dispose()
    db.drop_namespace("sqlite", f"{namespace}_ch05")


def _keys(client, ns):
    return sorted(client.scan_iter(match=f"{ns}:*", count=1000))


# --- keys ---------------------------------------------------------------------------------


def test_keys_are_namespaced_bounded_and_versioned():
    assert caching.cache_key("product", 7) == "ch05:product:7"
    assert caching.cache_key("product", 7, namespace="x") == "x:product:7"
    long_input = "red shoes " * 50
    key = caching.cache_key("search", long_input)
    assert " " not in key and len(key) < 40
    assert caching.search_key("Red  Shoes") == caching.search_key("red shoes")
    assert caching.record_key("orders", 3, 2) != caching.record_key("orders", 3, 3)
    assert caching.record_key("orders", 3, 2) != caching.record_key("users", 3, 2)
    with pytest.raises(ValueError):
        caching.cache_key()
    with pytest.raises(ValueError):
        caching.cache_key("")


# --- cache-aside --------------------------------------------------------------------------


def test_cached_counts_one_compute_per_key_and_sets_the_ttl(redis_client, ns):
    calls = []

    def compute(value):
        return lambda: calls.append(value) or value

    for value in (0, [], {"a": 1}, 0, [], {"a": 1}):
        key = f"{ns}:v:{json.dumps(value)}"
        assert caching.cached(redis_client, key, 30, compute(value)) == value
    assert len(calls) == 3  # falsy cached values are hits
    assert 0 < redis_client.pttl(f"{ns}:v:0") <= 30_000


def test_cache_stats_and_clear(redis_client, ns):
    cache = caching.Cache(redis_client, ns, ttl_s=30)
    workload = caching.zipf_workload(200, 50, seed=1)
    for item in workload:
        cache.fetch(cache.key("item", item), lambda item=item: {"id": item})
    assert cache.stats.misses == len(set(workload)) == cache.stats.computes
    assert cache.stats.hits == len(workload) - len(set(workload))
    assert cache.clear() == len(set(workload))
    assert _keys(redis_client, ns) == []


def test_a_dead_cache_degrades_to_compute():
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    cache = caching.Cache(client, "dead")
    assert cache.fetch("x", lambda: 42) == 42
    assert cache.stats.errors == 1 and cache.stats.computes == 1 and cache.stats.hits == 0


# --- counting client, pattern deletes ------------------------------------------------------


def test_counting_client_counts_commands_and_pipelines(redis_client, ns):
    counting = caching.CountingRedis(redis_client)
    counting.set(f"{ns}:a", 1)
    counting.get(f"{ns}:a")
    with counting.pipeline(transaction=False) as pipe:
        pipe.set(f"{ns}:b", 1)
        pipe.set(f"{ns}:c", 1)
        pipe.execute()
    assert counting.calls["SET"] == 1 and counting.calls["GET"] == 1
    assert counting.calls["PIPELINE"] == 1 and counting.pipelined["SET"] == 2


def test_delete_pattern_uses_scan_and_batches(redis_client, ns):
    caching.fill_keys(redis_client, f"{ns}:scan:", 2500)
    assert caching.delete_pattern(redis_client, f"{ns}:scan:*", count=500) == 2500
    assert _keys(redis_client, ns) == []
    other = f"{ns}:keep"
    redis_client.set(other, 1)
    caching.fill_keys(redis_client, f"{ns}:gone:", 120)
    counting = caching.CountingRedis(redis_client)
    assert caching.delete_pattern(counting, f"{ns}:gone:*", count=50) == 120
    assert counting.calls["KEYS"] == 0 and counting.calls["SCAN"] >= 1
    assert counting.calls["DEL"] >= 3  # SCAN may return a key twice while the table resizes
    assert redis_client.exists(other) == 1


# --- counters, stampedes ------------------------------------------------------------------


def _get_then_set(client, key, pause):
    """GET + SET"""
    value = int(client.get(key) or 0)
    pause()
    client.set(key, value + 1)


def _incr(client, key, pause):
    """INCR"""
    client.incr(key)


def test_get_set_loses_updates_incr_does_not(redis_client, ns):
    naive = caching.counter_race(redis_client, f"{ns}:n", _get_then_set, workers=3, rounds=10)
    atomic = caching.counter_race(redis_client, f"{ns}:n", _incr, workers=3, rounds=10)
    assert (naive["case"], naive["counted"], naive["lost"]) == ("GET + SET", 10, 20)
    assert (atomic["case"], atomic["counted"], atomic["lost"]) == ("INCR", 30, 0)
    assert _keys(redis_client, ns) == []


def _fetch_without_lock(client, key, compute):
    """every miss recomputes"""
    value = client.get(key)
    if value is None:
        value = compute()
        client.set(key, value, ex=60)
    return value


def _fetch_with_lock(client, key, compute):
    """SET NX PX lock"""
    value = client.get(key)
    if value is not None:
        return value
    if client.set(key + ":lock", "1", nx=True, px=5000):
        try:
            value = compute()
            client.set(key, value, ex=60)
        finally:
            client.delete(key + ":lock")
        return value
    while value is None:
        time.sleep(0.005)
        value = client.get(key)
    return value


def test_stampede_counts_are_deterministic(redis_client, ns):
    none = caching.stampede(redis_client, f"{ns}:hot", _fetch_without_lock, threads=6,
                            compute_s=0.01)
    locked = caching.stampede(redis_client, f"{ns}:hot", _fetch_with_lock, threads=6,
                              compute_s=0.01)
    assert none["case"] == "every miss recomputes" and locked["case"] == "SET NX PX lock"
    assert none["recomputations"] == 6 and none["served"] == 6
    assert locked["recomputations"] == 1 and locked["served"] == 6
    assert _keys(redis_client, ns) == []


def test_stampede_says_when_fetch_never_reads(redis_client, ns):
    def blind(client, key, compute):
        return compute()

    with pytest.raises(TimeoutError, match="never read the key"):
        caching.stampede(redis_client, f"{ns}:hot", blind, threads=2, compute_s=0.0)


def _xfetch(now, expiry, rng):
    """XFetch with delta 1 s, beta 1"""
    return now - 1.0 * 1.0 * math.log(1.0 - rng.random()) >= expiry


def test_xfetch_recomputes_more_as_expiry_nears():
    table = caching.xfetch_recomputes(_xfetch, window_s=5)
    assert table.seconds_before_expiry.tolist() == [5, 4, 3, 2, 1]
    assert table.requests.tolist() == [50] * 5
    assert table.would_recompute.iloc[-1] > table.would_recompute.iloc[0]
    assert table.equals(caching.xfetch_recomputes(_xfetch, window_s=5))
    assert 0 < table.attrs["first_refresh_before_expiry_s"] <= 5
    never = caching.xfetch_recomputes(lambda now, expiry, rng: False, window_s=2)
    assert never.would_recompute.sum() == 0


# --- workloads and hit rates ----------------------------------------------------------------


def test_zipf_workload_is_seeded_and_skewed():
    a = caching.zipf_workload(5000, 1000, seed=3)
    assert a == caching.zipf_workload(5000, 1000, seed=3)
    assert a != caching.zipf_workload(5000, 1000, seed=4)
    assert min(a) >= 1 and max(a) <= 1000
    top = max(set(a), key=a.count)
    assert a.count(top) > 5000 / 1000 * 20


def test_hit_rates_grow_with_size_and_ttl():
    workload = caching.zipf_workload(4000, 500, seed=2)
    by_size = caching.hit_rates_by_size(workload, [1, 10, 100, 500])
    assert by_size.hit_rate.is_monotonic_increasing
    assert by_size.hits.iloc[-1] == len(workload) - len(set(workload))  # everything fits
    assert caching.lru_hits(["a", "b", "a", "c", "b"], 2) == (1, 4)
    by_ttl = caching.hit_rates_by_ttl(workload, [0.001, 1, 100], rate_per_s=100)
    assert by_ttl.hit_rate.is_monotonic_increasing and by_ttl.hits.iloc[0] == 0
    assert caching.ttl_hits(["a", "a", "a"], 1.5, rate_per_s=1) == (1, 2)


# --- the product page, on every database -----------------------------------------------------


def test_product_page_and_queries_counted_per_case(seeded, redis_client, ns):
    from perfcourse.timing import Benchmark

    page = caching.product_page(seeded, 5)
    assert page["id"] == 5 and page["category"] and page["units"] >= page["orders"]
    workload = [1, 2, 1, 3, 2, 1]
    bench = Benchmark(repeat=2, warmup=1)

    @bench.case
    def no_cache(workload):
        """no cache"""
        for pid in workload:
            caching.product_page(seeded, pid)

    @bench.case(setup=lambda workload: caching.delete_pattern(redis_client, f"{ns}:*"))
    def cold(workload):
        """cache-aside, cold"""
        for pid in workload:
            caching.cached(redis_client, caching.cache_key("p", pid, namespace=ns), 30,
                           lambda pid=pid: caching.product_page(seeded, pid))

    table = caching.run_counting_queries(bench, seeded, workload=workload).set_index("case")
    assert table.db_queries.to_dict() == {"no cache": caching.PRODUCT_PAGE_QUERIES * 6,
                                          "cache-aside, cold": caching.PRODUCT_PAGE_QUERIES * 3}
    assert [case.fn for case in bench.cases] == [no_cache, cold]  # restored
    caching.delete_pattern(redis_client, f"{ns}:*")


# --- invalidation, fragments -----------------------------------------------------------------


def test_hook_removes_stale_reads(scratch, redis_client, ns):
    cache = caching.Cache(redis_client, ns)
    ids, changed = list(range(1, 11)), [2, 5, 9]
    without = caching.stale_reads(scratch, cache, ids, changed, hook=False)
    with_hook = caching.stale_reads(scratch, cache, ids, changed, hook=True)
    assert without["stale_reads"] == 3 and without["hits"] == 10
    assert with_hook["stale_reads"] == 0
    assert (with_hook["hits"], with_hook["misses"]) == (7, 3)
    assert _keys(redis_client, ns) == []


def test_invalidation_waits_for_commit(scratch, redis_client, ns):
    from sqlalchemy.orm import Session

    from perfcourse.models import Product

    cache = caching.Cache(redis_client, ns)
    with Session(scratch) as session:
        caching.read_product(session, cache, 3)
    key = caching.product_key(cache, 3)
    with caching.invalidate_on_change(cache), Session(scratch) as session:
        session.get(Product, 3).name = "renamed"
        session.flush()
        assert redis_client.exists(key) == 1  # not yet: the change is not committed
        session.rollback()
    assert redis_client.exists(key) == 1  # rolled back: the cached entry is still right
    with caching.invalidate_on_change(cache, after_commit=False), Session(scratch) as session:
        session.get(Product, 3).name = "renamed"
        session.flush()
        assert redis_client.exists(key) == 0
        session.rollback()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_russian_doll_renders_only_what_changed(backend, tiny, redis_client, ns, namespace,
                                                monkeypatch):
    if backend == "postgres":
        monkeypatch.delenv("DATABASE_URL", raising=False)
        eng = db.engine("postgres", namespace=f"{namespace}_doll")
        seed_dataset(eng, "tiny", progress=False)
    else:
        eng = scratch_copy(tiny, f"{namespace}_doll")
    try:
        caching.add_versions(eng)
        caching.add_versions(eng)  # idempotent
        fragments = caching.FragmentCache(redis_client, ns)
        with eng.connect() as conn:
            user_id = conn.exec_driver_sql(
                "SELECT user_id FROM orders GROUP BY user_id HAVING count(*) >= 2 "
                "ORDER BY user_id LIMIT 1").scalar_one()
        steps = caching.russian_doll_steps(eng, fragments, user_id).set_index("step")
        orders, items = steps.attrs["orders"], steps.attrs["items"]
        assert orders >= 2
        cold, warm = steps.loc["cold cache"], steps.loc["warm cache"]
        assert (cold.page_renders, cold.order_renders, cold.item_renders) == (1, orders, items)
        assert cold.queries == 2 + orders
        assert (warm.page_renders, warm.order_renders, warm.item_renders, warm.queries) == \
            (0, 0, 0, 1)
        touched = steps.loc["item changed, order touched"]
        assert (touched.page_renders, touched.order_renders, touched.item_renders) == (1, 1, 1)
        assert not touched.stale
        assert steps.loc["item changed, order not touched"].stale
        assert fragments.clear() > 0
    finally:
        eng.dispose()
        db.drop_namespace(backend, f"{namespace}_doll")


# --- degradation ---------------------------------------------------------------------------


def test_degraded_pages_serve_every_page(tiny, redis_mode, redis_client, ns):
    df = caching.degraded_pages(tiny, [1, 2, 3], namespace=ns, socket_timeout_s=0.05,
                                slow_delay_s=0.2)
    assert df.pages.tolist() == [3, 3, 3]
    assert df.hits.tolist() == [3, 0, 0]
    assert df.errors.tolist() == [0, 3, 3]
    assert df.db_queries.tolist() == [0, 9, 9]
    assert _keys(redis_client, ns) == []


# --- HTTP caching --------------------------------------------------------------------------


def _orders_validator(conn, user_id):
    count, newest = conn.exec_driver_sql(
        "SELECT count(*), max(updated_at) FROM orders WHERE user_id = ?", (user_id,)).one()
    return f"orders-{user_id}-" + caching.digest(f"{count}/{newest}"), newest


def test_conditional_requests_get_304_from_a_real_server(scratch):
    caching.add_versions(scratch)
    app = caching.create_app(scratch, validator=_orders_validator)
    paths = [f"/users/{u}/orders" for u in (1, 2, 3)]
    with web.BackgroundServer(app) as server:
        etag = caching.conditional_requests(server.url, paths, revisits=2)
        since = caching.conditional_requests(server.url, paths, revisits=1,
                                             validator="last-modified")
        missing = web.get(server.url, "/users/999999/orders")
    assert not server.thread.is_alive()
    first, revisit = etag.iloc[0], etag.iloc[1]
    assert (first.status_200, first.status_304) == (3, 0)
    assert (revisit.status_200, revisit.status_304, revisit.body_bytes) == (0, 6, 0)
    assert revisit.bytes_saved == 2 * first.body_bytes
    assert since.iloc[1].status_304 == 3
    assert missing.status == 404
    assert app.config["COUNTS"]["orders 304"] == 9
    assert app.config["COUNTS"]["orders loaded"] == 6


def test_a_status_change_makes_a_new_etag(scratch):
    from datetime import datetime

    caching.add_versions(scratch)
    with scratch.connect() as conn:
        order_id, status = conn.exec_driver_sql(
            "SELECT id, status FROM orders WHERE user_id = 1 ORDER BY id LIMIT 1").one()

    def set_status(new):
        with scratch.begin() as conn:
            conn.exec_driver_sql("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?",
                                 (new, datetime.now().isoformat(" "), order_id))

    def by_created_at(conn, user_id):
        count, newest = conn.exec_driver_sql(
            "SELECT count(*), max(created_at) FROM orders WHERE user_id = ?", (user_id,)).one()
        return f"{count}-" + caching.digest(str(newest)), newest

    rows = {}
    for name, validator, new in (("created_at", by_created_at, status + "!"),
                                 ("updated_at", _orders_validator, status + "?"),
                                 ("body digest", None, status)):
        with web.BackgroundServer(caching.create_app(scratch, validator=validator)) as server:
            rows[name] = caching.revisit_after_change(server.url, "/users/1/orders",
                                                      lambda new=new: set_status(new))
    assert rows["created_at"] == {"status": 304, "etag_changed": False, "stale": True}
    assert rows["updated_at"] == {"status": 200, "etag_changed": True, "stale": False}
    assert rows["body digest"] == {"status": 200, "etag_changed": True, "stale": False}


def test_fingerprinted_assets_are_immutable():
    app = caching.create_app(None, {"app.css": b"body{}"})
    name = caching.fingerprint("app.css", b"body{}")
    assert name != caching.fingerprint("app.css", b"body{ }")
    assert app.config["ASSET_URLS"]["app.css"] == f"/assets/{name}"
    headers = caching.asset_headers(app, ["app.css", name, "nope.css"]).set_index("url")
    assert headers.loc[f"/assets/{name}", "cache_control"] == caching.IMMUTABLE
    assert headers.loc["/assets/app.css", "cache_control"] == "no-cache"
    assert headers.loc["/assets/app.css", "etag"] == "yes"
    assert headers.loc["/assets/nope.css", "status"] == 404


# --- graded questions ------------------------------------------------------------------------
# The graders' own suite is tests/grading/test_ch05.py; here: the model answers pass on both
# Redis servers, and the chapter's helpers (which solve the lesson's cases) do not.


def test_practical_questions_accept_the_model_answers(redis_mode, capsys):
    from perfcourse.grading.questions import ch05

    check("05.q3", ch05._reference_cached_lookup)
    check("05.q4", ch05._reference_listing_key)
    check("05.q5", ch05._reference_listing_invalidation)
    check("05.q6", ch05._reference_delete_leaked)
    assert capsys.readouterr().out.count("✓") == 4


@pytest.mark.parametrize("qid,helper", [("05.q3", "cached"), ("05.q5", "invalidate_on_change"),
                                        ("05.q6", "delete_pattern")])
def test_the_lessons_helpers_do_not_answer_the_exercises(redis_mode, qid, helper):
    with pytest.raises(AssertionError):
        check(qid, getattr(caching, helper))
    with pytest.raises(AssertionError, match="No answer yet"):
        check(qid, ...)


def test_redis_down_is_one_sentence(monkeypatch):
    from perfcourse.grading.questions import ch05

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(AssertionError, match="needs Redis and cannot reach it"):
        check("05.q3", ch05._reference_cached_lookup)


# ---------------------------------------------------------------------------------------------
# The lab's harness: page requests, replays, price changes, a hot key


def test_page_requests_are_seeded_zipf_with_currencies_and_tracking():
    first = caching.page_requests(2000, 500, seed=3)
    again = caching.page_requests(2000, 500, seed=3)
    assert [(q.product_id, q.currency, q.params, q.session_id) for q in first] == [
        (q.product_id, q.currency, q.params, q.session_id) for q in again]
    assert {q.currency for q in first} == set(caching.CURRENCIES)
    assert all(q.params["currency"] == q.currency for q in first)
    assert all(q.url.startswith(f"/products/{q.product_id}?") for q in first)
    assert sum("utm_source" in q.params for q in first) > 1000  # most links carry tracking
    distinct = len({(q.product_id, q.currency) for q in first})
    assert distinct < 1000  # popular products repeat
    mapped = caching.page_requests(50, 3, seed=3, product_ids=[70, 80, 90])
    assert {q.product_id for q in mapped} <= {70, 80, 90}


def test_price_in_converts_and_rounds_to_the_cent():
    assert caching.price_in("10.00", "EUR") == "10.00"
    assert caching.price_in("10.00", "USD") == "10.80"
    assert caching.price_in(Decimal("19.99"), "GBP") == "16.99"


class _DictPages:
    """A cache of pages in a dict, keyed by product and currency (a test double)."""

    def __init__(self):
        self.pages = {}

    def fetch(self, request, render):
        key = (request.product_id, request.currency)
        if key not in self.pages:
            self.pages[key] = render(*key)
        return self.pages[key]


def test_replay_pages_counts_renders_and_wrong_pages():
    requests = caching.page_requests(400, 100, seed=2)

    def render(product_id, currency):
        return {"id": product_id, "currency": currency}

    keyed = caching.replay_pages(_DictPages().fetch, requests, render, label="by page")
    assert keyed["renders"] == keyed["distinct_pages"]
    assert keyed["hit_rate"] == keyed["best_hit_rate"]
    assert keyed["wrong_pages"] == 0 and keyed["case"] == "by page"

    def one_key(request, render, box={}):  # noqa: B006 - the shared dict is the bug
        if "page" not in box:
            box["page"] = render(request.product_id, request.currency)
        return box["page"]

    shared = caching.replay_pages(one_key, requests, render)
    assert shared["renders"] == 1
    assert shared["wrong_pages"] > 300


def test_page_renderer_counts_and_converts(tiny):
    render = caching.PageRenderer(tiny)
    page = render(1, "USD")
    assert render.renders == 1
    assert page == render.truth(1, "USD") and render.renders == 1
    base = caching.product_page(tiny, 1)
    assert page["price"] == caching.price_in(base["price"], "USD")
    assert page["currency"] == "USD" and page["id"] == 1


class _DictPagesWithListeners(_DictPages):
    def __init__(self, when):
        super().__init__()
        self.when = when

    def listeners(self):
        from sqlalchemy.orm import object_session

        def drop(ids):
            for key in [k for k in self.pages if k[0] in ids]:
                del self.pages[key]

        def note(mapper, connection, target):
            if self.when == "flush":
                drop({target.id})
            else:
                object_session(target).info.setdefault("ids", set()).add(target.id)

        def commit(session):
            drop(session.info.pop("ids", set()))

        return {"after_update": note, "after_commit": commit}


@pytest.mark.parametrize("when,stale,recached", [(None, 6, 0), ("flush", 6, 6), ("commit", 0, 0)])
def test_price_change_trial_counts_stale_pages_and_the_window(scratch, when, stale, recached):
    from sqlalchemy import event

    from perfcourse.models import Product

    cache = _DictPagesWithListeners(when) if when else _DictPages()
    render = caching.PageRenderer(scratch)

    def change(session):
        for pid in (2, 5):
            session.get(Product, pid).price += Decimal("1.00")

    before = len(Product.__mapper__.dispatch.after_update)
    trial = caching.price_change_trial(scratch, cache, change, product_ids=[1, 2, 3, 4, 5],
                                       render=render,
                                       listeners=cache.listeners() if when else None)
    hooks = cache.listeners() if when else {}
    assert trial["pages"] == 15
    assert trial["stale"] == stale
    assert trial["recached_in_window"] == recached
    assert trial["renders_after"] == (6 if when == "commit" else 0)
    assert len(Product.__mapper__.dispatch.after_update) == before
    assert all(not event.contains(Product, "after_update", fn) for fn in hooks.values())


def _plain(client, key, compute, now, fresh_s):
    raw = client.get(key)
    if raw is not None:
        return json.loads(raw)
    value = compute()
    client.set(key, json.dumps(value), ex=int(fresh_s))
    return value


def _stale_while_revalidate(nx):
    def fetch(client, key, compute, now, fresh_s):
        raw = client.get(key)
        if raw is not None:
            entry = json.loads(raw)
            if now < entry["until"]:
                return entry["value"]
            if nx:
                got = client.set(key + ":lock", 1, nx=True, px=2000)
            else:  # check, then set: the race the trial makes happen every time
                got = not client.get(key + ":lock")
                if got:
                    client.set(key + ":lock", 1, px=2000)
            if not got:
                return entry["value"]
        value = compute()
        client.set(key, json.dumps({"value": value, "until": now + fresh_s}), ex=int(10 * fresh_s))
        client.delete(key + ":lock")
        return value
    return fetch


def _lock_and_poll(client, key, compute, now, fresh_s):
    raw = client.get(key)
    if raw is not None:
        return json.loads(raw)
    if client.set(key + ":lock", 1, nx=True, px=2000):
        value = compute()
        client.set(key, json.dumps(value), ex=int(fresh_s))
        client.delete(key + ":lock")
        return value
    for _ in range(400):
        time.sleep(0.005)
        raw = client.get(key)
        if raw is not None:
            return json.loads(raw)
    return compute()


def test_hot_key_trial_counts_recomputations_and_waiting(redis_client):
    key = redis_client.prefix + "hot"
    plain = caching.hot_key_trial(redis_client, key, _plain, threads=6, fresh_s=20)
    assert plain["expired"] and plain["recomputations"] == 6 and plain["waited"] == 0
    assert plain["fresh_recomputes"] == 0 and plain["first_value_ok"] and plain["refreshed"]
    swr = caching.hot_key_trial(redis_client, key, _stale_while_revalidate(True), threads=6,
                                fresh_s=20)
    assert not swr["expired"] and swr["recomputations"] == 1 and swr["waited"] == 0
    assert swr["served_old"] == 5 and swr["served_new"] == 1 and swr["served_other"] == 0
    assert 0 < swr["lock_ttl_ms"] <= 2000 and swr["lock_left_ms"] == -2
    race = caching.hot_key_trial(redis_client, key, _stale_while_revalidate(False), threads=6,
                                 fresh_s=20)
    assert race["recomputations"] == 6 and race["lock_set_without_nx"] == 6
    polled = caching.hot_key_trial(redis_client, key, _lock_and_poll, threads=4, fresh_s=20,
                                   patience_s=0.3)
    assert polled["recomputations"] == 1 and polled["waited"] == 3
    assert list(redis_client.scan_iter(match=key + "*")) == []
