"""Tests of chapter 09's harness and detectors: N+1, missing indexes, stale caches, the lab."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from perfcourse.chapters import common_performance_issues as cpi
from perfcourse.models import Order
from perfcourse.scratch import memory_copy
from perfcourse.statements import StatementRecord, slow_query_log

from .conftest import database_engine, unique_namespace


@pytest.fixture
def tiny():
    engine = memory_copy("tiny")
    yield engine
    engine.dispose()


# --------------------------------------------------------------------------------------------
# Memory harness


def test_memory_over_requests_tells_a_leak_from_a_bounded_cache():
    kept = {}

    def leaky(request):
        kept[request.id] = bytearray(1000)

    flat = cpi.memory_over_requests(lambda request: bytearray(1000), 2_000, every=500)
    grows = cpi.memory_over_requests(leaky, 2_000, every=500)
    assert list(grows.requests) == [0, 500, 1000, 1500, 2000]
    assert grows.traced_bytes.iloc[-1] > 1_900_000
    assert grows.traced_bytes.is_monotonic_increasing
    assert flat.traced_bytes.iloc[-1] < 100_000


def test_fake_requests_are_seeded_and_numbered():
    first = list(cpi.fake_requests(5, seed=1))
    assert first == list(cpi.fake_requests(5, seed=1))
    assert [r.id for r in cpi.fake_requests(3, start=10)] == [10, 11, 12]
    assert all(1 <= p <= 2_000 for r in first for p in r.product_ids)


def test_fragmentation_reports_each_stage():
    table = cpi.fragmentation(objects=50_000, keep_every=64)
    assert len(table) == 4
    assert table.live_blocks.iloc[1] > table.live_blocks.iloc[2] > 0


def test_leaky_app_leaks_and_reports():
    answers = []

    def start_response(status, headers):
        answers.append((status, dict(headers)))

    before = len(cpi._LEAKED)
    body = b"".join(cpi.leaky_app({"PATH_INFO": "/page"}, start_response))
    assert b'"leaked"' in body and len(cpi._LEAKED) == before + 1
    assert answers[0][1]["X-Worker-Pid"]
    assert b"ok" in b"".join(cpi.leaky_app({"PATH_INFO": "/health"}, start_response))
    cpi._LEAKED.clear()


# --------------------------------------------------------------------------------------------
# N+1 detector


def lazy_page(session):
    orders = session.scalars(sa.select(Order).where(Order.user_id == 3)).all()
    return [len(o.items) for o in orders]


def eager_page(session):
    orders = session.scalars(sa.select(Order).where(Order.user_id == 3).options(selectinload(Order.items))).all()
    return [len(o.items) for o in orders]


def test_fingerprint_hides_values():
    assert cpi.fingerprint("SELECT * FROM t WHERE id = 5 AND n = 'x'") == cpi.fingerprint(
        "select *  from t where id = ? and n = ?")
    assert cpi.fingerprint("WHERE id IN (1, 2, 3)") == cpi.fingerprint("where id in (?)")
    assert cpi.fingerprint("WHERE a = %(a_1)s") == "where a = ?"


def test_detector_fails_with_the_offending_sql(tiny):
    with pytest.raises(cpi.NPlusOneError, match="order_items") as caught:
        with cpi.forbid_n_plus_one(tiny, max_repeats=1), Session(tiny) as session:
            lazy_page(session)
    assert isinstance(caught.value, AssertionError)
    with cpi.forbid_n_plus_one(tiny, max_repeats=1) as detector, Session(tiny) as session:
        eager_page(session)
    assert detector.count == 2 and detector.verdict() is None


def test_detector_settings(tiny):
    with Session(tiny) as session, cpi.NPlusOneDetector(tiny, max_repeats=1, raise_on_exit=False) as detector:
        lazy_page(session)
    assert detector.offenders and detector.repeats().runs.iloc[0] > 1
    with Session(tiny) as session, cpi.NPlusOneDetector(tiny, max_repeats=1, ignore=["order_items"]) as ignored:
        lazy_page(session)
    assert ignored.count == 1
    with pytest.raises(cpi.NPlusOneError, match="at most 1 allowed"):
        with Session(tiny) as session, cpi.NPlusOneDetector(tiny, max_repeats=50, max_statements=1):
            eager_page(session)
    with pytest.raises(ValueError):
        cpi.NPlusOneDetector(tiny, max_repeats=0)


def test_detector_does_not_hide_the_blocks_own_error(tiny):
    with pytest.raises(KeyError):
        with cpi.forbid_n_plus_one(tiny, max_repeats=1), Session(tiny) as session:
            lazy_page(session)
            raise KeyError("the page's own bug")


def test_middleware_reports_per_request(tiny):
    def app(environ, start_response):
        with Session(tiny) as session:
            (lazy_page if environ["PATH_INFO"] == "/lazy" else eager_page)(session)
        start_response("200 OK", [])
        return [b"ok"]

    reported = []
    wrapped = cpi.n_plus_one_middleware(app, tiny, max_repeats=1, on_detect=lambda p, m: reported.append(p))
    for path in ("/lazy", "/eager"):
        assert b"".join(wrapped({"PATH_INFO": path}, lambda *a: None)) == b"ok"
    assert reported == ["/lazy"]


def test_pytest_fixture_fails_the_n_plus_one_test(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import pytest
        from perfcourse.scratch import memory_copy
        from perfcourse.chapters.common_performance_issues import n_plus_one_fixture

        @pytest.fixture
        def engine():
            eng = memory_copy("tiny")
            yield eng
            eng.dispose()

        no_n_plus_one = n_plus_one_fixture("engine", max_repeats=1)
    """))
    (tmp_path / "test_pages.py").write_text(textwrap.dedent("""
        import sqlalchemy as sa
        from sqlalchemy.orm import Session, selectinload
        from perfcourse.models import Order

        def test_lazy(no_n_plus_one, engine):
            with Session(engine) as session:
                [len(o.items) for o in session.scalars(sa.select(Order).where(Order.user_id == 3))]

        def test_eager(no_n_plus_one, engine):
            with Session(engine) as session:
                [len(o.items) for o in session.scalars(
                    sa.select(Order).where(Order.user_id == 3).options(selectinload(Order.items)))]
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no",
                          "-rE", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "2 passed, 1 error" in run.stdout, run.stdout[-2000:]
    assert "NPlusOneError" in run.stdout and "order_items" in run.stdout


# --------------------------------------------------------------------------------------------
# Missing-index detector, on SQLite and PostgreSQL


@pytest.mark.parametrize("database", ["sqlite", "postgres-configured"])
def test_missing_index_detector_flags_large_scans_only(database, monkeypatch):
    namespace = unique_namespace("ch09")
    engine = database_engine(database, namespace, monkeypatch)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE big (id INTEGER PRIMARY KEY, email VARCHAR(40))"))
            conn.execute(sa.text("CREATE TABLE small (id INTEGER PRIMARY KEY, name VARCHAR(40))"))
            conn.execute(sa.text("INSERT INTO big (id, email) VALUES (:id, :email)"),
                         [{"id": i, "email": f"u{i}@x"} for i in range(1, 3001)])
            conn.execute(sa.text("INSERT INTO small (id, name) VALUES (1, 'a')"))
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("ANALYZE big"))
        with slow_query_log(engine, 0.0) as log, engine.connect() as conn:
            for i in (5, 9):
                conn.execute(sa.text("SELECT id FROM big WHERE email = :e"), {"e": f"u{i}@x"}).all()
                conn.execute(sa.text("SELECT id FROM big WHERE id = :i"), {"i": i}).all()
                conn.execute(sa.text("SELECT id FROM small WHERE name = :n"), {"n": "a"}).all()
        flags = cpi.find_missing_indexes(engine, log.slow)
        assert list(flags.table) == ["big"], flags
        assert flags.calls.iloc[0] == 2 and "email" in flags.sql.iloc[0]
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE INDEX ix_big_email ON big (email)"))
        engine.dispose()
        assert cpi.find_missing_indexes(engine, log.slow).empty
        # (sql, parameters) pairs and strings are accepted too
        assert len(cpi.find_missing_indexes(engine, ["SELECT * FROM big WHERE email LIKE 'u%'"]))
    finally:
        engine.dispose()
        if database != "sqlite":
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{namespace}" CASCADE'))
        else:
            from perfcourse import db
            db.drop_namespace("sqlite", namespace)


def test_bindable_turns_driver_placeholders_into_names():
    assert cpi._bindable("a = ? AND b = ?", (1, 2)) == ("a = :p0 AND b = :p1", {"p0": 1, "p1": 2})
    assert cpi._bindable("a = %(x)s AND b LIKE 'a%%'", {"x": 1}) == ("a = :x AND b LIKE 'a%'", {"x": 1})
    assert cpi._as_text_statement(StatementRecord("SELECT 1", ())) == ("SELECT 1", ())


# --------------------------------------------------------------------------------------------
# Stale-cache detector and the caches


def test_stale_entries_found_after_a_write():
    source = {"a": 1, "b": 2}
    cache = cpi.DictCache()
    for key, value in source.items():
        cache.set(key, value)
    assert cpi.find_stale_entries(cache, source.get).empty
    source["a"] = 5
    stale = cpi.find_stale_entries(cache, source.get)
    assert list(stale.key) == ["a"] and stale.fresh.iloc[0] == 5
    assert cache.delete("a", "zz") == 1 and cache.get("a") is None and cache.misses == 1


def test_redis_cache_namespaced(redis_mode):
    from perfcourse.services import redis_client

    client = redis_client()
    cache = cpi.RedisCache(client, f"{cpi.NAMESPACE}:test:{unique_namespace()}:")
    try:
        cache.set("user:1:summary", {"orders": 2})
        assert cache.get("user:1:summary") == {"orders": 2}
        assert cache.keys() == ["user:1:summary"]
        assert list(cpi.find_stale_entries(cache, lambda key: {"orders": 3}).key) == ["user:1:summary"]
    finally:
        cache.clear()
    assert cache.keys() == []
    with pytest.raises(ValueError):
        cpi.RedisCache(client, "other:")


# --------------------------------------------------------------------------------------------
# The lab service


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lab_issues_are_found_by_the_detectors(tiny, seed):
    lab = cpi.LabService(tiny, seed=seed, copy=False, current=False)
    key = lab._grading_key()
    paths = lab.paths(60)
    flagged = set()
    with slow_query_log(lab.engine, 0.0) as log:
        for path in paths:
            with cpi.NPlusOneDetector(lab.engine, max_repeats=1, raise_on_exit=False) as detector:
                lab.handle(path)
            if detector.verdict():
                flagged.add(path.split("?")[0])
    templates = {"/" + "/".join("<id>" if p.isdigit() else p for p in f.strip("/").split("/")) for f in flagged}
    assert templates == {key["n_plus_one"]}
    flags = cpi.find_missing_indexes(lab.engine, log.slow, min_rows=100)
    assert {cpi.fingerprint(sql) for sql in flags.sql} == {cpi.fingerprint(key["missing_index_sql"])}
    for uid in range(1, 6):
        lab.read(f"user:{uid}:summary")
    for pid in range(1, 11):
        lab.read(f"product:{pid}:card")
    lab.place_order(1, 1, 1)
    lab.change_price(2, 1.5)
    with lab.engine.connect() as conn:
        category = conn.execute(sa.text("SELECT category_id FROM products WHERE id = 3")).scalar_one()
    lab.rename_category(category, "x")
    stale = set(cpi.find_stale_entries(lab.cache, lab.recompute).key)
    assert stale
    expected_kind = {"place_order": "user:", "change_price": "product:2:", "rename_category": "product:"}
    assert all(k.startswith(expected_kind[key["stale_write"]]) for k in stale)


def test_lab_routes_all_answer(tiny):
    lab = cpi.LabService(tiny, seed=5, copy=False, current=False)
    for path in lab.paths(len(lab.routes)):
        assert lab.handle(path) is not None
    with pytest.raises(KeyError):
        lab.handle("/nowhere")
    lab.extra_invalidation = lambda event: 42
    with pytest.raises(TypeError, match="list of cache keys"):
        lab.change_price(1, 2.0)
    assert cpi.current_lab() is not lab


def test_lab_on_a_scratch_copy(tmp_path, monkeypatch):
    from perfcourse import db

    monkeypatch.setenv("PERFCOURSE_DATA", str(tmp_path))
    source = db.engine("sqlite", scale="tiny")
    from perfcourse.seed import seed_dataset

    seed_dataset(source, "tiny", progress=False)
    lab = cpi.LabService(source, seed=4)
    try:
        assert cpi.current_lab() is lab
        assert (tmp_path / f"{cpi.NAMESPACE}_lab.sqlite").exists()
        lab.change_price(1, 9.0)
        with source.connect() as conn:  # the course dataset is untouched
            assert conn.execute(sa.text("SELECT price FROM products WHERE id = 1")).scalar_one() != 9.0
    finally:
        lab.close()
        source.dispose()
    assert not (tmp_path / f"{cpi.NAMESPACE}_lab.sqlite").exists()
