"""Chapter 05, caching: cache-aside, keys, invalidation, pattern deletes, stampedes, HTTP caching.

Practical questions run the learner's code against the course's real Redis, under a private key
prefix of the grader (``grader05:<random>:``) deleted afterwards, and against a private SQLite
database of the grader: never the learner's own keys or data. Each practical asks for a variant
of what the lesson demonstrates (the lesson: plain cache-aside, a record's key, a product's key
deleted after commit, every key of a pattern deleted), graded by behaviour the learner cannot
hard-code: loads on a hidden access sequence and the TTLs left, keys of hidden collections,
stale reads after hidden transactions, the commands sent and the keys left. The reference answers
live here, private to the grader.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session, object_session

from perfcourse.chapters import caching
from perfcourse.chapters.caching import CountingRedis
from perfcourse.models import Base, Category, Product
from perfcourse.units import format_duration

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    NoAnswer,
    call_learner,
    need_function,
    short_repr,
    time_limit,
    type_name,
)
from ..datasets import PrivateRedis

__all__ = [
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# The grader's Redis: a private prefix, always cleaned up


def _PrivateRedis():
    return PrivateRedis("grader05")


def _forbid_blocking(client: CountingRedis) -> None:
    for name in ("KEYS", "FLUSHDB", "FLUSHALL"):
        if client.calls[name]:
            raise Incorrect(f"Your function sent {name}: it blocks the whole server (or wipes "
                            "it). Never use it on a shared Redis.")


# --------------------------------------------------------------------------------------------
# 05.q3: cache-aside that also caches misses (cache penetration)


#: Hidden values: records that exist (falsy ones included) and records that do not (None).
_LOOKUPS = {"zero": 0, "empty-list": [], "empty-text": "", "false": False,
            "product": {"id": 7, "price": "19.90"}, "ids": [3, 1, 2], "ratio": 0.25,
            "gone-1": None, "gone-2": None, "gone-3": None}
_TTL_S, _MISSING_TTL_S = 240, 12


def _reference_cached_lookup(client, key, ttl_s, missing_ttl_s, load):
    raw = client.get(key)
    if raw is not None:
        return json.loads(raw)  # JSON null: a cached "does not exist"
    value = load()
    client.set(key, json.dumps(value), ex=ttl_s if value is not None else missing_ttl_s)
    return value


class _CachedLookupCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("05.q3", cached_lookup)')
        rng = random.Random(5003)
        names = list(_LOOKUPS)
        sequence = names + [rng.choice(names) for _ in range(40)]
        rng.shuffle(sequence)
        # Written by another process before the check: a value and a cached miss.
        warm = {"warm-hit": {"warm": True}, "warm-missing": None}
        with _PrivateRedis() as redis_:
            for name, value in warm.items():
                redis_.client.set(redis_.prefix + name, json.dumps(value), ex=_TTL_S)
            client = CountingRedis(redis_.client)
            loads = Counter()
            everything = {**_LOOKUPS, **warm}
            for name in [*sequence, *warm]:
                expected = everything[name]

                def load(name=name, expected=expected):
                    loads[name] += 1
                    return expected

                before = loads[name]
                got = call_learner(answer, client, redis_.prefix + name, _TTL_S, _MISSING_TTL_S,
                                   load)
                if before == 0 and loads[name] == 1 and name in _LOOKUPS:
                    self._check_ttl(redis_, name, expected)  # at once, before it can expire
                if expected is None and got is not None:
                    raise Incorrect(
                        f"For a record that does not exist (load() returned None) your function "
                        f"returned {short_repr(got, 40)}: return None, both on the miss and on "
                        "later hits of the cached miss (store it as JSON null).")
                if got != expected or type(got) is not type(expected):
                    hint = " Did you forget `return`?" if got is None else ""
                    raise Incorrect(
                        f"For the key ...:{name} your function returned {short_repr(got, 40)}, "
                        f"expected {short_repr(expected, 40)}: store values as JSON "
                        f"(json.dumps) and return json.loads of what GET gives back.{hint}")
            _forbid_blocking(client)
            again = sorted(n for n, times in loads.items() if times > 1 and n in _LOOKUPS)
            missing_again = [n for n in again if _LOOKUPS[n] is None]
            falsy_again = [n for n in again if _LOOKUPS[n] is not None and not _LOOKUPS[n]]
            if any(_LOOKUPS[n] for n in again) or loads["warm-hit"]:
                raise Incorrect(
                    f"load() ran again for keys already cached ({', '.join(again)}): on a hit "
                    "(GET returned something), return json.loads of it without calling load().")
            if falsy_again:
                raise Incorrect(
                    f"load() ran again for keys already cached ({', '.join(again)}): a cached "
                    "0, [], \"\", false or null is a hit too. Test `raw is not None` on what GET "
                    "returned, not the truthiness of the value.")
            if loads["warm-hit"]:
                raise Incorrect("A key already in Redis (JSON written by another process) was "
                                "loaded again: on a hit, return the stored value without load().")
            if loads["warm-missing"]:
                raise Incorrect("A cached miss already in Redis (JSON null) was loaded again: a "
                                "stored null is a hit that means \"does not exist\".")
            if missing_again:
                raise Incorrect(
                    f"load() ran {sum(loads[n] for n in missing_again)} times for "
                    f"{len(missing_again)} records that do not exist: every request for them "
                    "went to the database (cache penetration). Cache the miss too: store JSON "
                    "null with the shorter missing_ttl_s.")

    @staticmethod
    def _check_ttl(redis_, name, value):
        ttl_ms = redis_.client.pttl(redis_.prefix + name)
        what = "cached miss" if value is None else "cached value"
        wanted = _MISSING_TTL_S if value is None else _TTL_S
        if ttl_ms == -2 and value is None:
            raise Incorrect(
                "A miss (load() returned None) was not cached, so every request for a record "
                "that does not exist goes to the database (cache penetration). Cache the miss "
                "too: store JSON null with the shorter missing_ttl_s.")
        if ttl_ms == -2:
            raise Incorrect(f"A {what} was not stored in Redis under its key (...:{name}).")
        if ttl_ms == -1:
            raise Incorrect(f"Your {what}s never expire: pass the TTL to SET (ex=...).")
        if ttl_ms < 1000:
            raise Incorrect(f"A {what} lives {ttl_ms / 1000:.3g} s instead of {wanted} s: "
                            "ex= takes seconds, px= milliseconds.")
        if value is None and ttl_ms > _MISSING_TTL_S * 1000 + 50:
            raise Incorrect(
                f"A cached miss lives {ttl_ms / 1000:.0f} s, as long as a value: give misses the "
                "shorter missing_ttl_s, so a record created meanwhile shows up soon.")
        if value is not None and ttl_ms <= _MISSING_TTL_S * 1000 + 50:
            raise Incorrect(
                f"A value that exists was cached for only {ttl_ms / 1000:.3g} s: values get "
                "ttl_s (in seconds), only misses get missing_ttl_s.")
        if ttl_ms > wanted * 1000 + 50:
            raise Incorrect(f"A {what} lives {ttl_ms / 1000:.0f} s, longer than the "
                            f"{wanted} s asked for: the TTLs are in seconds.")
        if ttl_ms < wanted * 1000 * 0.5:
            raise Incorrect(f"A {what} lives {ttl_ms / 1000:.3g} s instead of {wanted} s: "
                            "ex= takes seconds, px= milliseconds.")

    def model_answer(self):
        return ("def cached_lookup(client, key, ttl_s, missing_ttl_s, load):\n"
                "    raw = client.get(key)\n"
                "    if raw is not None:\n"
                "        return json.loads(raw)  # JSON null: a cached \"does not exist\"\n"
                "    value = load()\n"
                "    ttl = ttl_s if value is not None else missing_ttl_s\n"
                "    client.set(key, json.dumps(value), ex=ttl)\n"
                "    return value")


# --------------------------------------------------------------------------------------------
# 05.q4: the key of a collection (count + newest updated_at)


@dataclass(frozen=True)
class _Row:
    """One product of a category listing, as the learner's function receives it."""

    id: int
    updated_at: datetime
    name: str


def _reference_listing_key(category_id, products):
    newest = max((p.updated_at for p in products), default=None)
    stamp = newest.strftime("%Y%m%d%H%M%S%f") if newest else "none"
    return f"ch05:categories/{category_id}/products-{len(products)}-{stamp}"


def _listings() -> list[tuple[int, list[_Row]]]:
    rng = random.Random(5004)
    base = datetime(2025, 3, 1, 12, 0, 0)
    out = []
    for size in (5, 9, 2, 14):
        category_id = rng.randint(10, 9_999)
        rows = [_Row(rng.randint(1, 99_999),
                     base + timedelta(seconds=rng.randint(0, 10**7),
                                      microseconds=rng.randint(0, 999_999)),
                     "A product name with spaces " * rng.randint(1, 6))
                for _ in range(size)]
        out.append((category_id, rows))
    return out


def _key_of(answer, category_id, rows, what):
    try:
        key = call_learner(answer, category_id, list(rows))
    except NoAnswer:
        raise
    except Incorrect as exc:
        raise Incorrect(f"{exc} (for {what})") from None
    if not isinstance(key, str):
        raise Incorrect(f"Return the key as a string (got a {type_name(key)} for {what}).")
    return key


class _ListingKeyCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("05.q4", listing_cache_key)')
        rng = random.Random(50041)
        seen: dict[str, int] = {}
        for category_id, rows in _listings():
            newest = max(rows, key=lambda r: r.updated_at)
            key = _key_of(answer, category_id, rows, f"category {category_id}")
            if not key.startswith("ch05:"):
                raise Incorrect(f"{short_repr(key, 50)} is outside the chapter's namespace: "
                                "start every key with \"ch05:\".")
            if any(c.isspace() for c in key):
                raise Incorrect(f"{short_repr(key, 60)} holds a space (str() of a datetime has "
                                "one, a name has several): use isoformat(), a timestamp or "
                                "strftime, never free text.")
            if len(key) > 120:
                raise Incorrect(f"The key is {len(key)} characters for {len(rows)} products: "
                                "keep it bounded (the count and the newest updated_at, not "
                                "every id).")
            if _key_of(answer, category_id, [replace(r) for r in rows], "a copy") != key:
                raise Incorrect("The same products gave two different keys: the key must "
                                "depend only on the category and its products' data.")
            shuffled = list(rows)
            while shuffled == rows:
                rng.shuffle(shuffled)
            if _key_of(answer, category_id, shuffled, "the same products reordered") != key:
                raise Incorrect(
                    "The same products in another order gave another key: the rows come in any "
                    "order, so use max(updated_at) and len(), not the first or last row.")
            if key in seen:
                raise Incorrect(f"Two categories share the key {short_repr(key, 50)}: put the "
                                "category id in the key.")
            seen[key] = category_id
            if _key_of(answer, category_id + 1, rows, "another category") == key:
                raise Incorrect(f"Category {category_id} and category {category_id + 1}, with "
                                "the same products, got the same key: put the category id in "
                                "the key.")
            older = [r for r in rows if r is not newest]
            added = [*rows, _Row(rng.randint(100_000, 199_999),
                                 min(r.updated_at for r in rows) - timedelta(days=3), "new")]
            if _key_of(answer, category_id, added, "one product more") == key:
                raise Incorrect(
                    f"After a product (older than the newest) joined category {category_id} "
                    f"the key stayed {short_repr(key, 50)}: readers would get the old listing. "
                    "Put the number of products in the key.")
            if _key_of(answer, category_id, [newest, *older[1:]], "one product less") == key:
                raise Incorrect(
                    f"After a product left category {category_id} the key stayed "
                    f"{short_repr(key, 50)}: put the number of products in the key.")
            later = [replace(r, updated_at=newest.updated_at + timedelta(seconds=2))
                     if r is older[0] else r for r in rows]
            if _key_of(answer, category_id, later, "one product updated") == key:
                raise Incorrect(
                    f"After a product of category {category_id} was updated (its updated_at "
                    f"now the newest) the key stayed {short_repr(key, 50)}: put the newest "
                    "updated_at (max over the products) in the key.")
            soon = [replace(r, updated_at=newest.updated_at + timedelta(microseconds=300))
                    if r is older[0] else r for r in rows]
            if _key_of(answer, category_id, soon, "an update 0.3 ms later") == key:
                raise Incorrect(
                    "An update 0.3 ms after the newest one left the key unchanged: keep the "
                    "microseconds of updated_at (isoformat(), strftime with %f or timestamp()).")
        empty = [_key_of(answer, c, [], "a category with no products") for c in (41, 42)]
        for key in empty:
            if not key.startswith("ch05:") or any(c.isspace() for c in key):
                raise Incorrect(f"For a category with no products the key was "
                                f"{short_repr(key, 50)}: it must start with \"ch05:\" and hold "
                                "no spaces.")
        if empty[0] == empty[1]:
            raise Incorrect("Two empty categories share a key: put the category id in the key.")
        category_id, rows = _listings()[0]
        if empty[0] == _key_of(answer, 41, rows, "category 41"):
            raise Incorrect("An empty category and a full one got the same key.")
        big = [_Row(i, datetime(2025, 1, 1) + timedelta(minutes=i), "x") for i in range(1, 401)]
        key = _key_of(answer, 7, big, "a category of 400 products")
        if len(key) > 120:
            raise Incorrect(f"For a category of 400 products your key is {len(key)} characters: "
                            "keep it bounded (the count and the newest updated_at, not every "
                            "id).")

    def model_answer(self):
        return ("def listing_cache_key(category_id, products):\n"
                "    newest = max((p.updated_at for p in products), default=None)\n"
                "    stamp = newest.strftime(\"%Y%m%d%H%M%S%f\") if newest else \"none\"\n"
                "    return f\"ch05:categories/{category_id}/products-{len(products)}-{stamp}\"")


# --------------------------------------------------------------------------------------------
# 05.q5: invalidate category listings after the commit (never during the flush)

_MAPPER_EVENTS = frozenset({"before_insert", "after_insert", "before_update", "after_update",
                            "before_delete", "after_delete"})
_SESSION_EVENTS = frozenset({"before_flush", "after_flush", "after_flush_postexec",
                             "before_commit", "after_commit", "after_rollback",
                             "after_soft_rollback", "after_transaction_end", "after_begin",
                             "after_transaction_create"})
#: Moments between a change reaching the database and its commit: a reader may run then.
_WINDOW_EVENTS = ("after_flush", "after_flush_postexec", "before_commit")
_PENDING = "perfcourse.grader05.stale_listings"


def _reference_listing_invalidation(client, key_for):
    def note(mapper, connection, target):
        pending = object_session(target).info.setdefault(_PENDING, set())
        pending.add(target.category_id)
        moved_from = sa.inspect(target).attrs.category_id.history.deleted
        pending.update(c for c in moved_from if c is not None)

    def after_commit(session):
        categories = session.info.pop(_PENDING, set())
        if categories:
            client.delete(*(key_for(c) for c in categories))

    def after_rollback(session):
        session.info.pop(_PENDING, None)

    return {"after_insert": note, "after_update": note, "after_delete": note,
            "after_commit": after_commit, "after_rollback": after_rollback}


class _GraderSession(Session):
    """The grader's own Session class: the learner's session listeners go on it, not on all."""


class _Shop:
    """The grader's private shop (a SQLite file) and the cached listing of each category.

    ``read_missing`` is a concurrent reader: a listing missing from the cache is loaded from
    what is committed (another connection) and cached again, as any request would do.
    """

    categories = (1, 2, 3, 4)

    def __init__(self, folder: Path, client, key_for):
        self.engine = sa.create_engine(f"sqlite:///{folder / 'grader05.db'}")
        self.client, self.key_for = client, key_for
        self.recached: set[int] = set()
        Base.metadata.create_all(self.engine)
        rng = random.Random(5005)
        with Session(self.engine) as session:
            for c in self.categories:
                session.add(Category(id=c, name=f"grader {c}"))
            for i in range(1, 17):
                session.add(Product(id=i, category_id=self.categories[i % 4], name=f"p{i}",
                                    price=Decimal(rng.randint(100, 9999)) / 100, active=True))
            session.commit()

    def listing(self, category_id: int) -> str:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, price FROM products WHERE category_id = :c "
                                        "ORDER BY id"), {"c": category_id}).all()
        return json.dumps([[row[0], str(row[1])] for row in rows])

    def warm(self) -> None:
        self.recached.clear()
        for c in self.categories:
            self.client.set(self.key_for(c), self.listing(c), ex=300)

    def read_missing(self, *_args) -> None:
        for c in self.categories:
            if not self.client.exists(self.key_for(c)):
                self.client.set(self.key_for(c), self.listing(c), ex=300)
                self.recached.add(c)

    def missing(self) -> list[int]:
        return [c for c in self.categories if not self.client.exists(self.key_for(c))]

    def stale(self) -> list[int]:
        out = []
        for c in self.categories:
            raw = self.client.get(self.key_for(c))
            if raw is not None and raw.decode() != self.listing(c):
                out.append(c)
        return out

    def product_in(self, session, category_id: int) -> Product:
        return session.scalars(sa.select(Product).where(Product.category_id == category_id)
                               .order_by(Product.id)).first()


def _valid_hooks(hooks, what: str, example: str) -> dict:
    """The learner's ``{event name: listener}`` dict, or a hint saying what is wrong with it."""
    if not isinstance(hooks, dict) or not hooks:
        raise Incorrect(f"{what} must return a dict from event names to listener functions, e.g. "
                        f"{example} (got a {type_name(hooks)}).")
    for name, fn in hooks.items():
        if name not in _MAPPER_EVENTS | _SESSION_EVENTS:
            raise Incorrect(
                f"{name!r} is not an event this exercise knows: use mapper events "
                f"({', '.join(sorted(_MAPPER_EVENTS))}) or session events "
                f"({', '.join(sorted(_SESSION_EVENTS))}).")
        if not callable(fn):
            raise Incorrect(f"The listener for {name!r} is a {type_name(fn)}, not a function.")
    return hooks


def _listeners(answer, client, key_for) -> dict:
    return _valid_hooks(call_learner(answer, client, key_for), "make_listing_invalidation",
                        '{"after_update": note, "after_commit": flush_keys}')


class _ListingInvalidationCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("05.q5", make_listing_invalidation)')
        folder = Path(tempfile.mkdtemp(prefix="grader05-"))
        attached = []
        try:
            with _PrivateRedis() as redis_:
                def key_for(category_id):
                    return f"{redis_.prefix}listing:{category_id}"

                client = CountingRedis(redis_.client)
                shop = _Shop(folder, redis_.client, key_for)
                hooks = _listeners(answer, client, key_for)
                for name, fn in hooks.items():
                    target = Product if name in _MAPPER_EVENTS else _GraderSession
                    sa.event.listen(target, name, fn)
                    attached.append((target, name, fn))
                for name in _WINDOW_EVENTS:  # after the learner's: a reader in the window
                    sa.event.listen(_GraderSession, name, shop.read_missing)
                    attached.append((_GraderSession, name, shop.read_missing))
                call_learner(self._scenarios, shop)
                _forbid_blocking(client)
        finally:
            for target, name, fn in attached:
                sa.event.remove(target, name, fn)
            if "shop" in locals():
                shop.engine.dispose()
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _verify(shop: _Shop, changed: set[int], what: str, event: str) -> None:
        stale = shop.stale()
        if stale:
            c = stale[0]
            if c in shop.recached:
                raise Incorrect(
                    f"{what}: the listing of category {c} was deleted before the commit, and a "
                    "reader in between cached the old listing again. Note the category during "
                    "the flush (session.info) and delete its key in after_commit.")
            raise Incorrect(
                f"{what}: the listing of category {c} still showed the old data after the "
                f"commit. Note the category in {event} and delete key_for(category) in "
                "after_commit.")
        lost = [c for c in shop.missing() if c not in changed]
        if lost:
            raise Incorrect(
                f"{what}: the listing of category {lost[0]}, which did not change, was deleted "
                "too. Delete only the keys of the categories this session changed.")

    def _scenarios(self, shop: _Shop) -> None:
        # An update, committed.
        shop.warm()
        with _GraderSession(shop.engine) as session:
            product = shop.product_in(session, 1)
            product.price += Decimal("1.25")
            session.flush()  # as a query's autoflush would
            session.commit()
        self._verify(shop, {1}, "After a price update", "after_update")
        # An insert, a delete.
        shop.warm()
        with _GraderSession(shop.engine) as session:
            session.add(Product(id=101, category_id=2, name="new", price=Decimal("3.50"),
                                active=True))
            session.commit()
        self._verify(shop, {2}, "After a product was inserted", "after_insert")
        shop.warm()
        with _GraderSession(shop.engine) as session:
            session.delete(shop.product_in(session, 3))
            session.commit()
        self._verify(shop, {3}, "After a product was deleted", "after_delete")
        # A product moves: the old category's listing is stale too.
        shop.warm()
        with _GraderSession(shop.engine) as session:
            shop.product_in(session, 4).category_id = 1
            session.commit()
        stale = shop.stale()
        if stale == [4]:
            raise Incorrect(
                "After a product moved from category 4 to 1, the listing of category 4 still "
                "showed it: on update note the old category as well (sqlalchemy.inspect(target)"
                ".attrs.category_id.history.deleted).")
        self._verify(shop, {1, 4}, "After a product moved to another category", "after_update")
        # A rollback deletes nothing, now or at the next commit.
        shop.warm()
        with _GraderSession(shop.engine) as session:
            shop.product_in(session, 2).price += Decimal("2")
            session.flush()
            shop.read_missing()
            session.rollback()
            gone = shop.missing()
            if gone:
                raise Incorrect(
                    f"After a rollback the listing of category {gone[0]} was deleted: nothing "
                    "changed, so on rollback forget the noted keys and delete none.")
            shop.product_in(session, 3).price += Decimal("1")
            session.commit()
        if 2 in shop.missing():
            raise Incorrect(
                "A change to category 2 was rolled back, yet its listing was deleted at the next "
                "commit: clear the noted keys in after_rollback.")
        self._verify(shop, {3}, "After a rollback and a commit", "after_update")
        # Two sessions: one commits while the other has flushed but not committed.
        shop.warm()
        with _GraderSession(shop.engine) as first, _GraderSession(shop.engine) as second:
            shop.product_in(first, 4).price += Decimal("4")
            first.flush()
            second.get(Product, 1)
            second.commit()
            shop.read_missing()
            first.commit()
        if shop.stale():
            raise Incorrect(
                "Another session's commit deleted the key of a change that was flushed but not "
                "committed yet, and a reader cached the old listing again: keep the noted keys "
                "per session (session.info), not in one shared set.")
        self._verify(shop, {4}, "With two sessions", "after_update")

    def model_answer(self):
        return (
            "def make_listing_invalidation(client, key_for):\n"
            "    def note(mapper, connection, target):\n"
            "        pending = object_session(target).info.setdefault(\"stale\", set())\n"
            "        pending.add(target.category_id)\n"
            "        old = sqlalchemy.inspect(target).attrs.category_id.history.deleted\n"
            "        pending.update(c for c in old if c is not None)\n"
            "\n"
            "    def after_commit(session):\n"
            "        categories = session.info.pop(\"stale\", set())\n"
            "        if categories:\n"
            "            client.delete(*(key_for(c) for c in categories))\n"
            "\n"
            "    def after_rollback(session):\n"
            "        session.info.pop(\"stale\", None)\n"
            "\n"
            "    return {\"after_insert\": note, \"after_update\": note, \"after_delete\": note,\n"
            "            \"after_commit\": after_commit, \"after_rollback\": after_rollback}")


# --------------------------------------------------------------------------------------------
# 05.q6: delete the leaked keys of a pattern (no TTL) with SCAN, in batches


def _reference_delete_leaked(client, pattern, batch=500):
    deleted, keys = 0, []

    def flush(keys):
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.ttl(key)
            ttls = pipe.execute()
        leaked = [key for key, ttl in zip(keys, ttls) if ttl == -1]
        return client.delete(*leaked) if leaked else 0

    for key in client.scan_iter(match=pattern, count=batch):
        keys.append(key)
        if len(keys) == batch:
            deleted += flush(keys)
            keys = []
    if keys:
        deleted += flush(keys)
    return deleted


class _BatchRedis(CountingRedis):
    """A counting client that also records the largest batch sent and how SCAN was called."""

    #: More SCANs from cursor 0 than this: the loop starts over instead of following the cursor.
    restarts_allowed = 3

    def __init__(self, source):
        super().__init__(source)
        self.largest_batch = 0
        self.scan_from_zero = 0
        self.largest_scan_count = 0

    def execute_command(self, *args, **options):
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        name = name.upper()
        if name == "SCAN":
            self._note_scan(args)
        elif name in ("DEL", "UNLINK", "EXISTS", "MGET", "TOUCH"):
            self.largest_batch = max(self.largest_batch, len(args) - 1)
        return super().execute_command(*args, **options)

    def _note_scan(self, args):
        if str(args[1]) == "0":
            self.scan_from_zero += 1
            if self.scan_from_zero > self.restarts_allowed:
                raise Incorrect(
                    "Your loop called SCAN with cursor 0 again and again: pass the cursor each "
                    "SCAN returns to the next call and stop when it comes back as 0 "
                    "(client.scan_iter does this).")
        words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
        for i, word in enumerate(words[:-1]):
            if word.upper() == "COUNT":
                self.largest_scan_count = max(self.largest_scan_count, int(words[i + 1]))

    def pipeline(self, transaction: bool = True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def counted_execute(raise_on_error: bool = True):
            self.largest_batch = max(self.largest_batch, len(pipe.command_stack))
            return execute(raise_on_error)

        pipe.execute = counted_execute
        return pipe


class _DeleteLeakedCheck(Checker):
    matching = 1500
    batch = 100
    others = 300

    def grade(self, answer):
        need_function(answer, 'check("05.q6", delete_leaked)')
        rng = random.Random(5006)
        with _PrivateRedis() as redis_:
            prefix = redis_.prefix
            leaked, expiring = set(), set()
            raw = redis_.client
            with raw.pipeline(transaction=False) as pipe:
                for i in range(self.matching):
                    key = f"{prefix}cache:item:{i}"
                    if i % 25 == 0:
                        pipe.hset(key, mapping={"id": i})  # not every cached value is a string
                    else:
                        pipe.set(key, "x")
                    if rng.random() < 0.6:
                        leaked.add(key.encode())
                    else:
                        pipe.expire(key, 600)
                        expiring.add(key.encode())
                for i in range(self.others):  # no TTL either, but outside the pattern
                    pipe.set(f"{prefix}session:{i}", "x")
                    pipe.set(f"{prefix}cache-archive:{i}", "x")
                pipe.execute()
            client = _BatchRedis(raw)
            result = call_learner(answer, client, f"{prefix}cache:*", self.batch)
            _forbid_blocking(client)
            if not client.calls["SCAN"]:
                raise Incorrect("Your function never sent SCAN: walk the keys with "
                                "client.scan_iter(match=pattern, count=...).")
            left = set(redis_.keys())
            leaked_left = len(leaked & left)
            expiring_lost = len(expiring - left)
            others_lost = 2 * self.others - len({k for k in left if not k.startswith(
                f"{prefix}cache:".encode())})
            if expiring_lost:
                raise Incorrect(
                    f"{expiring_lost} matching keys that had a TTL were deleted too: delete only "
                    "the leaked ones, whose TTL is -1 (no expiry); -2 means the key is gone.")
            if others_lost:
                raise Incorrect(f"{others_lost} keys that do not match the pattern were deleted: "
                                "pass match=pattern to SCAN.")
            if leaked_left:
                raise Incorrect(
                    f"{leaked_left} of {len(leaked)} matching keys without a TTL are still "
                    "there: follow SCAN's cursor until it comes back as 0, and delete every "
                    "key whose TTL is -1.")
            self._check_round_trips(client)
            if isinstance(result, bool) or not isinstance(result, int) or result != len(leaked):
                raise Incorrect(f"Return the number of keys deleted ({len(leaked)} here), not "
                                f"{short_repr(result, 30)}.")

    def _check_round_trips(self, client: _BatchRedis) -> None:
        if client.largest_scan_count > 1000:
            raise Incorrect(
                f"SCAN was asked for COUNT {client.largest_scan_count}: one such call walks "
                "much of the keyspace at once, as KEYS does. Keep COUNT near the batch size.")
        if client.largest_batch > self.batch:
            raise Incorrect(
                f"One round trip carried {client.largest_batch} keys, more than batch = "
                f"{self.batch}: split the keys into batches of at most `batch`.")
        trips = sum(n for name, n in client.calls.items() if name != "SCAN")
        budget = 2 * math.ceil(self.matching / self.batch) + 3
        if trips > budget:
            per_key = client.calls["TTL"] + client.calls["PTTL"] + client.calls["DEL"]
            detail = (" (a TTL or DEL per key?)" if per_key > self.matching // 2 else
                      " (a round trip per SCAN reply? SCAN replies hold any number of keys)")
            raise Incorrect(
                f"All right, but with {trips} round trips besides SCAN for {self.matching} "
                f"matching keys{detail}: collect `batch` keys, then ask their TTLs in one "
                "pipeline and delete the leaked ones with one DEL (or UNLINK).")

    def model_answer(self):
        return (
            "def delete_leaked(client, pattern, batch=500):\n"
            "    def clean(keys):\n"
            "        with client.pipeline(transaction=False) as pipe:\n"
            "            for key in keys:\n"
            "                pipe.ttl(key)\n"
            "            ttls = pipe.execute()\n"
            "        leaked = [k for k, ttl in zip(keys, ttls) if ttl == -1]\n"
            "        return client.delete(*leaked) if leaked else 0\n"
            "\n"
            "    deleted, keys = 0, []\n"
            "    for key in client.scan_iter(match=pattern, count=batch):\n"
            "        keys.append(key)\n"
            "        if len(keys) == batch:\n"
            "            deleted, keys = deleted + clean(keys), []\n"
            "    if keys:\n"
            "        deleted += clean(keys)\n"
            "    return deleted")


# --------------------------------------------------------------------------------------------
# The lab (05.q9-q11): the product page that never hits, its stale price, the hot key
#
# The learner's cache is driven through the chapter's lab harness (caching.page_requests,
# PageRenderer, price_change_trial, hot_key_trial) on hidden inputs: another Zipf stream, other
# products and prices, other updates, another number of threads and freshness.

#: The lab's freshness budget: a product page (its sales figures) may be this old.
_PAGE_BUDGET_S = 300
#: Requests per second on product pages, for the TTL's hit rate on a simulated clock.
_PAGE_RATE_PER_S = 5
#: How far below the budget TTL's simulated hit rate a TTL may fall.
_TTL_SLACK = 0.05


class _PageRecorder(CountingRedis):
    """A counting client that also notes every key the learner's code writes."""

    def __init__(self, source):
        super().__init__(source)
        self.written: set[str] = set()

    def execute_command(self, *args, **options):
        if args and str(args[0]).upper() in ("SET", "SETEX", "PSETEX", "SETNX", "GETSET",
                                             "INCR", "INCRBY", "HSET") and len(args) > 1:
            name = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
            with self._lock:
                self.written.add(name)
        return super().execute_command(*args, **options)


def _page_cache(answer, client, prefix, qid, *methods):
    cache = call_learner(answer, client, prefix)
    for name in methods:
        if not callable(getattr(cache, name, None)):
            raise Incorrect(f"{type_name(cache)} has no method {name}(): pass the class itself, "
                            f"e.g. check(\"{qid}\", {'PageCache' if qid == '05.q9' else 'PriceSafePageCache'}), "
                            "whose instances have fetch(request, render)"
                            + (" and listeners()." if "listeners" in methods else "."))
    return cache


class _Catalog:
    """The grader's hidden products: a page in any currency, renders counted (no database)."""

    def __init__(self, ids, rng):
        self.products = {pid: (f"Product {pid}", Decimal(rng.randint(199, 99_999)) / 100)
                         for pid in ids}
        self.renders = 0

    def truth(self, product_id, currency):
        name, price = self.products[product_id]
        return {"id": product_id, "name": name, "currency": currency,
                "price": caching.price_in(price, currency)}

    def __call__(self, product_id, currency):
        self.renders += 1
        return self.truth(product_id, currency)


def _clean_outside(redis_, recorder):
    outside = [k for k in recorder.written if not k.startswith(redis_.prefix)]
    for start in range(0, len(outside), 500):
        redis_.client.delete(*outside[start:start + 500])
    return outside


class _PageCacheCheck(Checker):
    requests = 3000
    products = 1500

    def grade(self, answer):
        need_function(answer, 'check("05.q9", PageCache)')
        rng = random.Random(5009)
        ids = rng.sample(range(10_000, 99_999), self.products)
        stream = caching.page_requests(self.requests, self.products, seed=rng.randint(100, 999),
                                       s=1.05, product_ids=ids)
        catalog = _Catalog(ids, rng)
        with _PrivateRedis() as redis_:
            client = _PageRecorder(redis_.client)
            try:
                self._replay(answer, redis_, client, stream, catalog)
            finally:
                _clean_outside(redis_, client)

    def _replay(self, answer, redis_, client, stream, catalog):
        cache = _page_cache(answer, client, redis_.prefix, "05.q9", "fetch")
        seen: dict[tuple[int, str], str] = {}
        for number, req in enumerate(stream):
            page = call_learner(cache.fetch, req, catalog)
            expected = catalog.truth(req.product_id, req.currency)
            if page != expected:
                self._wrong_page(req, page, expected)
            seen.setdefault((req.product_id, req.currency), req.session_id)
            if number == 0:
                self._check_prefix(redis_, client)
                self._check_ttl(redis_, client)
        _forbid_blocking(client)
        self._check_prefix(redis_, client)
        distinct = len(seen)
        if catalog.renders > distinct * 1.02 + 2:
            raise Incorrect(self._why_missed(redis_, stream, catalog.renders, distinct))
        keys = redis_.keys()
        if not keys:
            raise Incorrect("Nothing was stored in Redis: keep the pages there (client.set), so "
                            "every worker process shares them.")
        other = _page_cache(answer, client, redis_.prefix, "05.q9", "fetch")  # another worker
        before = catalog.renders
        for req in stream[:40]:
            call_learner(other.fetch, req, catalog)
        if catalog.renders != before:
            raise Incorrect(
                f"A second PageCache (another worker process) rendered {catalog.renders - before} "
                "pages the first one had cached: keep the pages in Redis, not in the object.")
        self._check_ttl(redis_, client, stream)

    @staticmethod
    def _check_prefix(redis_, client):
        outside = sorted(k for k in client.written if not k.startswith(redis_.prefix))
        if outside:
            raise Incorrect(f"Your cache wrote {short_repr(outside[0], 60)}, outside the prefix it "
                            "was given: start every key with prefix, the lab's namespace.")

    @staticmethod
    def _wrong_page(req, page, expected):
        if not isinstance(page, dict):
            hint = " Did you forget `return`?" if page is None else ""
            raise Incorrect(f"fetch returned {short_repr(page, 50)} (a {type_name(page)}) for "
                            f"{req.url}: return the page dict, as render() gave it (JSON in "
                            f"Redis, json.loads on a hit).{hint}")
        if page.get("id") != req.product_id:
            raise Incorrect(
                f"{req.url} got the page of product {short_repr(page.get('id'), 20)}: two "
                "products share a key. Put the product id in the key.")
        if page.get("currency") != req.currency:
            raise Incorrect(
                f"{req.url} got the page in {short_repr(page.get('currency'), 10)}, not "
                f"{req.currency}: the currency changes the page, so it belongs in the key.")
        raise Incorrect(f"For {req.url} fetch returned {short_repr(page, 80)}, expected "
                        f"{short_repr(expected, 80)}: return what render() gave (JSON round "
                        "trip), unchanged.")

    @staticmethod
    def _why_missed(redis_, stream, renders, distinct):
        keys = [k.decode() for k in redis_.keys()]
        text = " ".join(keys[:400])
        named = []
        if any(r.session_id in text for r in stream[:400]):
            named.append("the session id")
        if any(v in text for r in stream[:400] for k, v in r.params.items() if k != "currency"):
            named.append("tracking parameters (utm_source, utm_campaign, ref)")
        if "/products/" in text or "?" in text:
            named.append("the URL")
        what = (" Your keys hold " + " and ".join(named) + ": they differ for visitors who see "
                "the same page.") if named else ""
        return (f"{len(stream):,} requests for {distinct:,} distinct pages made {renders:,} renders "
                f"(hit rate {1 - renders / len(stream):.0%}, the best is "
                f"{1 - distinct / len(stream):.0%}).{what} Key a page by what changes it: the "
                "product id and the currency, nothing else.")

    @staticmethod
    def _check_ttl(redis_, client, stream=None):
        ttls = {k: redis_.client.pttl(k) for k in redis_.keys()}
        if not ttls:
            raise Incorrect("After the first request nothing was stored under the prefix: store "
                            "the page with client.set(key, json.dumps(page), ex=ttl).")
        if -1 in ttls.values():
            raise Incorrect("Your pages never expire: pass the TTL to SET (ex=...). Without it a "
                            "page's sales figures stay old forever.")
        longest, shortest = max(ttls.values()) / 1000, min(ttls.values()) / 1000
        if longest > _PAGE_BUDGET_S + 1:
            raise Incorrect(f"A page lives {longest:.0f} s in the cache: longer than the "
                            f"{_PAGE_BUDGET_S} s its sales figures may be old.")
        if shortest < 2:
            raise Incorrect(f"A page lives {format_duration(shortest)} in the cache, gone before "
                            "the next visitor: ex= takes seconds, px= milliseconds.")
        if stream is None:
            return
        pages = [(r.product_id, r.currency) for r in stream]
        hits, _ = caching.ttl_hits(pages, max(shortest, 0.001), _PAGE_RATE_PER_S)
        best, _ = caching.ttl_hits(pages, _PAGE_BUDGET_S, _PAGE_RATE_PER_S)
        if hits / len(pages) < best / len(pages) - _TTL_SLACK:
            raise Incorrect(
                f"A TTL of {format_duration(shortest)} expires before most pages are asked for "
                f"again: at {_PAGE_RATE_PER_S} requests/s this stream would hit "
                f"{hits / len(pages):.0%} of the time, against {best / len(pages):.0%} with the "
                f"{_PAGE_BUDGET_S} s the budget allows (ex= takes seconds, px= milliseconds).")

    def model_answer(self):
        return (
            "class PageCache:\n"
            "    def __init__(self, client, prefix):\n"
            "        self.client, self.prefix = client, prefix\n"
            "\n"
            "    def key(self, product_id, currency):\n"
            "        return f\"{self.prefix}page:{product_id}:{currency}\"\n"
            "\n"
            "    def fetch(self, request, render):\n"
            "        key = self.key(request.product_id, request.currency)\n"
            "        raw = self.client.get(key)\n"
            "        if raw is not None:\n"
            "            return json.loads(raw)\n"
            "        page = render(request.product_id, request.currency)\n"
            "        self.client.set(key, json.dumps(page), ex=300)  # the freshness budget\n"
            "        return page")


def _grader_shop(folder: Path, rng):
    engine = sa.create_engine(f"sqlite:///{folder / 'grader05_lab.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Category(id=1, name="grader"))
        for pid in range(1, 13):
            session.add(Product(id=pid, category_id=1, name=f"product {rng.randint(100, 999)}",
                                price=Decimal(rng.randint(199, 9999)) / 100, active=True))
        session.commit()
    return engine


class _PriceInvalidationCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("05.q10", PriceSafePageCache)')
        rng = random.Random(5010)
        folder = Path(tempfile.mkdtemp(prefix="grader05-lab-"))
        engine = None
        try:
            engine = _grader_shop(folder, rng)
            with _PrivateRedis() as redis_:
                client = _PageRecorder(redis_.client)
                try:
                    self._scenarios(answer, redis_, client, engine, rng)
                finally:
                    _clean_outside(redis_, client)
                _forbid_blocking(client)
        finally:
            if engine is not None:
                engine.dispose()
            shutil.rmtree(folder, ignore_errors=True)

    def _scenarios(self, answer, redis_, client, engine, rng):
        cache = _page_cache(answer, client, redis_.prefix, "05.q10", "fetch", "listeners")
        hooks = _page_listeners(cache.listeners)
        render = caching.PageRenderer(engine)
        for pid in (1, 2):
            for currency in caching.CURRENCIES:
                page = call_learner(cache.fetch, caching.PageRequest(pid, currency,
                                                                     {"currency": currency}, "g"),
                                    render)
                if page != render.truth(pid, currency):
                    raise Incorrect("fetch (from your PageCache) returns another page than "
                                    "render() gave: make 05.q9 pass first.")
        ids = list(range(1, 13))
        first, second, third, fourth = rng.sample(ids, 4)

        def one_price(session):
            session.get(Product, first).price += Decimal("1.10")

        def several(session):
            session.get(Product, second).price += Decimal("2.00")
            product = session.get(Product, third)
            product.price = product.price * Decimal("0.9")
            session.flush()  # as a query's autoflush would: a second UPDATE of the same row
            product.price += Decimal("0.05")
            session.get(Product, fourth).name = "renamed " + session.get(Product, fourth).name

        for change, changed, what in [
                (one_price, {first}, f"After the price of product {first} went up"),
                (several, {second, third, fourth},
                 f"After products {second} and {third} changed price and {fourth} its name, "
                 "in one transaction")]:
            trial = call_learner(caching.price_change_trial, engine, cache, change,
                                 product_ids=ids, render=render, listeners=hooks)
            self._verify(trial, changed, what)

    @staticmethod
    def _verify(trial, changed, what):
        stale = trial["stale_pages"]
        if stale:
            pid, currency = stale[0]
            shown = sorted(c for p, c in stale if p == pid)
            if trial["recached_in_window"]:
                raise Incorrect(
                    f"{what}, the {currency} page of product {pid} showed the old data: it was "
                    "invalidated before the commit (during the flush), and a request in between "
                    "cached the old page again. Note the product during the flush "
                    "(session.info) and invalidate in after_commit.")
            if len(shown) < len(caching.CURRENCIES):
                fresh = sorted(set(caching.CURRENCIES) - set(shown))
                raise Incorrect(
                    f"{what}, the {', '.join(fresh)} page of product {pid} was right but the "
                    f"{', '.join(shown)} page still showed the old data: a product has one page "
                    "per currency. Delete every currency's page (or put a version in the key).")
            raise Incorrect(
                f"{what}, its pages still showed the old data after the commit: note the "
                "changed product in after_update and delete its pages in after_commit.")
        most = len(changed) * len(caching.CURRENCIES)
        if trial["renders_after"] > most:
            raise Incorrect(
                f"{what}, reading every page again rendered {trial['renders_after']} pages, "
                f"but only {most} (the changed products' pages) were out of date: invalidate "
                "only the pages of the products this session changed.")

    def model_answer(self):
        return (
            "class PriceSafePageCache(PageCache):\n"
            "    def listeners(self):\n"
            "        def note(mapper, connection, target):\n"
            "            session = object_session(target)\n"
            "            session.info.setdefault(\"changed_products\", set()).add(target.id)\n"
            "\n"
            "        def delete_pages(session):\n"
            "            ids = session.info.pop(\"changed_products\", set())\n"
            "            keys = [self.key(i, c) for i in ids for c in caching.CURRENCIES]\n"
            "            if keys:\n"
            "                self.client.delete(*keys)\n"
            "\n"
            "        def forget(session):\n"
            "            session.info.pop(\"changed_products\", None)\n"
            "\n"
            "        return {\"after_update\": note, \"after_delete\": note,\n"
            "                \"after_commit\": delete_pages, \"after_rollback\": forget}")


def _page_listeners(make) -> dict:
    return _valid_hooks(call_learner(make), "listeners()", '{"after_update": note, "after_commit": delete_pages}')


class _HotKeyCheck(Checker):
    #: Hidden trials: (requests released together, seconds a value stays fresh).
    trials = ((10, 45.0), (6, 20.0))

    def grade(self, answer):
        need_function(answer, 'check("05.q11", fetch_hot)')

        def guarded(*args):
            if threading.current_thread() is threading.main_thread():
                return call_learner(answer, *args)
            with time_limit(5.0):  # each request thread gets its own cap
                return call_learner(answer, *args)

        with _PrivateRedis() as redis_:
            client = CountingRedis(redis_.client)
            for threads, fresh_s in self.trials:
                trial = caching.hot_key_trial(client, f"{redis_.prefix}bestsellers", guarded,
                                              threads=threads, fresh_s=fresh_s)
                self._verify(trial, threads, fresh_s)
            _forbid_blocking(client)

    @staticmethod
    def _verify(t, threads, fresh_s):
        if not t["first_value_ok"]:
            raise Incorrect("On a cold miss (nothing stored) return what compute() gave.")
        if t["fresh_recomputes"]:
            raise Incorrect(
                f"A request {fresh_s / 2:g} s after the value was computed (fresh for {fresh_s:g} "
                "s) recomputed it: store the time it stays fresh (now + fresh_s) with the value, "
                "and return the value while now is before it.")
        if t["key_ttl_ms"] == -1:
            raise Incorrect("The stored value never expires in Redis: give it a TTL (ex=...) "
                            "several times fresh_s, so a key nobody reads goes away.")
        if t["expired"]:
            raise Incorrect(
                f"The stored value expired from Redis after {t['key_ttl_ms'] / 1000:.3g} s, "
                f"with its freshness ({fresh_s:g} s): at the stale moment there was no old copy "
                "to serve and every request missed. Keep it in Redis several times longer "
                "(e.g. ex=10 * fresh_s) and decide freshness with now.")
        if t["served_other"]:
            raise Incorrect("Some requests got neither the old nor the new value: return the "
                            "value compute() gave (stored as JSON), not the stored envelope.")
        if t["recomputations"] == 0:
            raise Incorrect(
                f"When the value went stale ({threads} requests at once), nobody recomputed it: "
                "one request must take the lock and refresh the value.")
        if t["recomputations"] > 1:
            if t["lock_set_without_nx"]:
                raise Incorrect(
                    f"{threads} requests found the value stale at once and {t['recomputations']} "
                    "recomputed: checking the lock (GET or EXISTS) and then setting it is a "
                    "race, every request sees it free. Take it in one command: SET key:lock "
                    "with nx=True and px=..., and recompute only if that returned True.")
            raise Incorrect(
                f"{threads} requests found the value stale at once and {t['recomputations']} "
                "recomputed it (a stampede): take key + \":lock\" with SET NX PX; only the "
                "request that got it recomputes.")
        if t["lock_ttl_ms"] == -1:
            raise Incorrect(
                "Your lock has no expiry: if the request holding it dies (a crash, a timeout), "
                "the lock stays forever and the value is never refreshed again. SET it with px=.")
        if t["lock_ttl_ms"] == -2:
            raise Incorrect("No key + \":lock\" was held while the value was recomputed: take "
                            "the lock under that name, with SET NX PX, before computing.")
        if t["lock_ttl_ms"] > 60_000:
            raise Incorrect(f"Your lock expires after {t['lock_ttl_ms'] / 1000:.0f} s: if its "
                            "holder dies, nobody refreshes the value for that long. A few "
                            "seconds (longer than one computation) is enough.")
        if t["waited"]:
            raise Incorrect(
                f"{t['waited']} of the {threads - 1} other requests waited for the refresh: "
                "while an old copy exists, return it at once (stale-while-revalidate); only the "
                "lock holder waits for compute().")
        if t["lock_left_ms"] != -2:
            raise Incorrect("The lock was still there after the refresh: delete it once the new "
                            "value is stored (in a finally:), so the next refresh can take it.")
        if not t["refreshed"]:
            raise Incorrect(
                "After the refresh, the next request did not get the new value without "
                "recomputing: store the new value with its new freshness (now + fresh_s).")

    def model_answer(self):
        return (
            "def fetch_hot(client, key, compute, now, fresh_s):\n"
            "    raw = client.get(key)\n"
            "    if raw is not None:\n"
            "        entry = json.loads(raw)\n"
            "        if now < entry[\"fresh_until\"]:\n"
            "            return entry[\"value\"]\n"
            "        if not client.set(key + \":lock\", 1, nx=True, px=5000):\n"
            "            return entry[\"value\"]  # someone refreshes: serve the old copy\n"
            "    try:\n"
            "        value = compute()\n"
            "        entry = {\"value\": value, \"fresh_until\": now + fresh_s}\n"
            "        client.set(key, json.dumps(entry), ex=int(10 * fresh_s))\n"
            "        return value\n"
            "    finally:\n"
            "        if raw is not None:\n"
            "            client.delete(key + \":lock\")")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="05.q1",
        title="How do you implement caching? (interview question 3)",
        checker=MultiChoice(
            options={
                "a": "Fragment caching: rendered pieces of templates, keyed by record id and "
                "version",
                "b": "Query results cached with no TTL, trusting LRU eviction to drop the stale "
                "ones",
                "c": "Low-level cache-aside: expensive results in Redis with a TTL",
                "d": "HTTP caching: ETag and Last-Modified, answered with 304 Not Modified",
                "e": "A Python dict in each gunicorn worker as the store for shared view "
                "counters",
                "f": "A shared external store (Redis) that every app process and server reads",
                "g": "Pages of logged-in users served with Cache-Control: public, so a CDN "
                "keeps them",
            },
            correct={"a", "c", "d", "f"},
            explanations={
                "b": "Eviction drops the entries nobody reads, not the ones that changed: a hot "
                "entry is read all the time, so it stays and goes on serving old data. Every "
                "entry needs a TTL, a versioned key or a delete on change.",
                "e": "Each worker process has its own dict: counts split between workers and "
                "vanish on restart. Shared counters belong in Redis (INCR).",
                "g": "public lets a shared cache (a CDN) store one user's page and serve it to "
                "others. Per-user responses are private (the chapter's orders API: private, "
                "no-cache).",
            },
        ),
        explanation="The guide's four layers: fragments (view), low-level cache-aside (data), "
        "HTTP validators (the browser or a CDN keeps the body), and Redis as the shared store "
        "behind them. Each was measured in this chapter.",
    ),
    Question(
        id="05.q2",
        title="Caching strategies (interview question 9)",
        checker=MultiChoice(
            options={
                "a": "Cache at several levels: application, database results, CDN/browser",
                "b": "Invalidate on change: delete or re-version the key when the record changes",
                "c": "Clear a namespace with KEYS ns:* then one DEL, the fewest round trips",
                "d": "Meaningful, bounded keys: namespace, kind, id, version",
                "e": "Raw search text in keys as typed, so that keys stay readable in redis-cli",
                "f": "A TTL on every entry, chosen from how stale the data may be",
                "g": "Warm the cache for hot keys before traffic arrives",
                "h": "Delete a record's key in the flush, before the commit, so none read it",
            },
            correct={"a", "b", "d", "f", "g"},
            explanations={
                "c": "KEYS walks every key of the server in one command and blocks all other "
                "clients meanwhile, however few round trips it saves: use SCAN with MATCH and "
                "COUNT, and delete in batches.",
                "e": "Raw input makes unbounded, unsafe keys (spaces, huge strings, endless "
                "variants of one query): normalise it and use a digest.",
                "h": "Between the flush and the commit a reader still sees the old row and puts "
                "it back in the cache, stale until the TTL. Note the key in the flush, delete it "
                "after the commit.",
            },
        ),
        explanation="Levels, invalidation, keys, TTLs and warming are the guide's five points; "
        "SCAN, digests and deleting after the commit keep the cache itself correct and fast.",
    ),
    Question(
        id="05.q3",
        title="Cache-aside that caches misses too",
        checker=_CachedLookupCheck(),
        explanation="GET first; a stored JSON null is a hit that means \"does not exist\", so "
        "requests for missing ids stop reaching the database (cache penetration). Misses get a "
        "shorter TTL, so a record created meanwhile shows up soon; a cached 0 or [] is a hit "
        "too (test `is not None` on what GET returned).",
        hints=("raw = client.get(key); if raw is not None: return json.loads(raw). Otherwise "
               "value = load(); SET json.dumps(value) with ex=ttl_s, or ex=missing_ttl_s when "
               "value is None; return value.",),
        time_limit=10.0,
    ),
    Question(
        id="05.q4",
        title="The key of a category listing",
        checker=_ListingKeyCheck(),
        explanation="Namespace + category + count + newest updated_at (the guide's "
        "`products/#{count}-#{max(updated_at)}`): adding, removing or updating a product makes "
        "a new key, whatever the order of the rows, and the old listing is simply never read "
        "again. Bounded, with no free text.",
        hints=("Count with len(products), take max(p.updated_at for p in products) (default "
               "None for an empty category) and format it with microseconds, no spaces.",),
    ),
    Question(
        id="05.q5",
        title="Invalidate listings after the commit",
        checker=_ListingInvalidationCheck(),
        explanation="Mapper events see each changed product during the flush, but the change is "
        "not committed yet: deleting then lets a reader cache the old listing again. So note "
        "the categories in session.info (the old one too when a product moves) and delete their "
        "keys in after_commit; on rollback forget them.",
        hints=("Return {\"after_insert\": note, \"after_update\": note, \"after_delete\": note, "
               "\"after_commit\": delete_noted, \"after_rollback\": forget}; note() adds "
               "target.category_id to object_session(target).info.",),
        time_limit=15.0,
    ),
    Question(
        id="05.q6",
        title="Delete leaked keys with SCAN",
        checker=_DeleteLeakedCheck(),
        explanation="scan_iter walks the keyspace in slices (the server serves others in "
        "between); asking the TTLs of a batch in one pipeline and deleting the leaked ones with "
        "one DEL keeps round trips at two per batch, not two per key.",
        hints=("Collect keys from client.scan_iter(match=pattern, count=batch); per batch, a "
               "pipeline of pipe.ttl(key), then client.delete(*keys whose TTL is -1); return "
               "the total deleted.",),
        time_limit=15.0,
    ),
    Question(
        id="05.q7",
        title="Stampede at expiry",
        checker=Choice(
            options={
                "a": "A cache stampede: one request rebuilds under a SET NX PX lock (or early, "
                "at random) while the others wait or get the old list",
                "b": "Cache penetration: cache the misses as well, with a short TTL, so that "
                "the 200 requests stop reaching the database",
                "c": "A lost update: the 200 requests overwrite each other's value; use INCR or "
                "a WATCH transaction so that no write is lost",
                "d": "Too short a TTL: make it ten times longer, or drop the expiry, so that "
                "the list stays cached for everyone",
                "e": "Redis is overloaded: add read replicas so that the 200 GETs of the key "
                "are spread over several servers",
            },
            correct="a",
            explanations={
                "b": "Penetration is about ids that do not exist, missed every time. The list "
                "exists; it expired for everyone at once, and each miss rebuilds it.",
                "c": "Nothing is counted or updated concurrently here: hundreds of requests "
                "rebuild the same value at once.",
                "d": "A longer TTL makes the stampede rarer, not smaller: at expiry every request "
                "still misses together (and without expiry the list goes stale).",
                "e": "200 GETs are nothing for Redis; the cost is 200 two-second queries on the "
                "database, which replicas of Redis do not remove.",
            },
        ),
        explanation="Simultaneous misses on one hot key all recompute: without protection the "
        "chapter counted one recomputation per request, with a SET NX lock exactly one.",
    ),
    Question(
        id="05.q8",
        title="Headers of a fingerprinted asset",
        checker=Choice(
            options={
                "a": "Cache-Control: no-cache, with an ETag",
                "b": "Cache-Control: private, max-age=31536000",
                "c": "Cache-Control: public, max-age=31536000, immutable",
                "d": "Cache-Control: no-store",
                "e": "Cache-Control: public, max-age=60, must-revalidate",
            },
            correct="c",
            explanations={
                "a": "no-cache makes every use a revalidation round trip: right for the plain "
                "name, wasted on a name that changes with the content.",
                "b": "private keeps shared caches (CDNs) out, yet the file is the same for every "
                "user: exactly what a CDN should keep.",
                "d": "no-store forbids caching: every page view downloads the file again.",
                "e": "60 s forces frequent refetches of a file that can never change under this "
                "name.",
            },
        ),
        explanation="app.e2f2b650.css can never change: new content gets a new name. So caches "
        "(browsers, CDNs) may keep it a year without asking again; `immutable` even skips the "
        "revalidation on reload.",
    ),
    Question(
        id="05.q9",
        title="Lab: product pages keyed by what changes them",
        checker=_PageCacheCheck(),
        explanation="A page differs by product and currency, and by nothing else the request "
        "carries: tracking parameters, the session and the URL's parameter order only split one "
        "page into thousands of keys that are each read once. Keyed by product and currency, a "
        "cold cache renders each distinct page once. The TTL comes from how old the page may be "
        "(5 minutes for its sales figures): the longest TTL the budget allows hits the most, "
        "and the price, which may not be old at all, is invalidated on change instead.",
        hints=("key = f\"{self.prefix}page:{request.product_id}:{request.currency}\"; GET it, "
               "json.loads on a hit; on a miss render(product_id, currency), SET json.dumps(page) "
               "with ex=300, return the page.",),
        time_limit=15.0,
    ),
    Question(
        id="05.q10",
        title="Lab: every currency's page invalidated after the commit",
        checker=_PriceInvalidationCheck(),
        explanation="A change to a product makes all its pages wrong, one per currency. Note "
        "the product id during the flush (after_update, per session in session.info) and delete "
        "its pages in after_commit: deleted earlier, a request between the flush and the commit "
        "caches the old page again. Pages of other products keep hitting. A version per product "
        "in the key, bumped after the commit, works too (key-based expiry).",
        hints=("listeners() returns {\"after_update\": note, \"after_commit\": delete_pages, "
               "\"after_rollback\": forget}; note adds target.id to object_session(target).info; "
               "delete_pages deletes self.key(id, currency) for every currency.",),
        time_limit=15.0,
    ),
    Question(
        id="05.q11",
        title="Lab: one refresh of a hot key, the old copy for everyone else",
        checker=_HotKeyCheck(),
        explanation="Store the value with the moment it stops being fresh and keep it in Redis "
        "much longer. Once stale, the request that wins SET key:lock NX PX recomputes; the "
        "others return the old copy at once (stale-while-revalidate), so nobody waits and the "
        "database sees one query. The lock's expiry frees it if its holder dies; a GET or "
        "EXISTS before the SET is a race, NX makes the check and the set one command.",
        hints=("Store json.dumps({\"value\": v, \"fresh_until\": now + fresh_s}) with "
               "ex=10 * fresh_s. Stale: if client.set(key + \":lock\", 1, nx=True, px=5000) "
               "recompute, store, delete the lock; else return the old value.",),
        time_limit=15.0,
    ),
]
