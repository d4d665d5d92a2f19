"""Chapter 05, caching: cache-aside, keys, invalidation, pattern deletes, stampedes, HTTP caching.

Practical questions run the learner's code against the course's real Redis, under a private key
prefix of the grader (``grader05:<random>:``) deleted afterwards, and against a private in-memory
SQLite database: never the learner's own keys or data. They are graded by behaviour the learner
cannot hard-code: hits, misses and recomputations on a hidden access sequence, keys of hidden
records, stale reads after updates, the commands sent and the keys left.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from perfcourse.chapters.caching import CountingRedis, cached, fill_keys
from perfcourse.models import Base, Category, Product

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    call_learner,
    need_function,
    short_repr,
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


# --------------------------------------------------------------------------------------------
# 05.q3: cache-aside


_VALUES = {"zero": 0, "empty-list": [], "empty-text": "", "false": False,
           "product": {"id": 7, "price": "19.90"}, "ids": [3, 1, 2], "ratio": 0.25, "name": "ada"}


class _CachedCheck(Checker):
    ttl_s = 60

    def grade(self, answer):
        need_function(answer, 'check("05.q3", cached)')
        rng = random.Random(5003)
        names = list(_VALUES)
        sequence = names + [rng.choice(names) for _ in range(30)]
        rng.shuffle(sequence)
        with _PrivateRedis() as redis_:
            client = CountingRedis(redis_.client)
            computes = Counter()
            # A value another process stored (JSON, as the course does): a hit from the start.
            warm = redis_.prefix + "warm"
            redis_.client.set(warm, json.dumps({"warm": True}), ex=self.ttl_s)
            for name in [*sequence, "warm"]:
                key = redis_.prefix + name

                def compute(name=name):
                    computes[name] += 1
                    return {"warm": True} if name == "warm" else _VALUES[name]

                got = call_learner(answer, client, key, self.ttl_s, compute)
                expected = {"warm": True} if name == "warm" else _VALUES[name]
                if got != expected or type(got) is not type(expected):
                    raise Incorrect(
                        f"For the key ...:{name} your function returned {short_repr(got, 40)}, "
                        f"expected {short_repr(expected, 40)}: store the value as JSON "
                        "(json.dumps) and return json.loads of what GET gives back on a hit.")
            if computes["warm"]:
                raise Incorrect("A key already in Redis (JSON) was computed again: on a hit, "
                                "return the stored value without calling compute.")
            again = sorted(n for n, times in computes.items() if times > 1)
            if again:
                falsy = all(not _VALUES[n] for n in again)
                raise Incorrect(
                    f"compute ran {sum(computes.values())} times for {len(computes)} distinct "
                    f"keys (again for {', '.join(again)})."
                    + (" A cached 0, [] or \"\" is a hit too: test `is not None`, not "
                       "truthiness." if falsy else " Store the value after computing it."))
            if set(computes) != set(_VALUES):
                raise Incorrect("Some missing key was never computed: on a miss, call compute().")
            for name in _VALUES:
                ttl_ms = redis_.client.pttl(redis_.prefix + name)
                if ttl_ms == -1:
                    raise Incorrect("Your keys never expire: pass the TTL to SET (ex= or px=).")
                if ttl_ms == -2:
                    raise Incorrect("A computed value was not stored in Redis under its key.")
                if ttl_ms > self.ttl_s * 1000 + 50:
                    raise Incorrect(f"A key lives {ttl_ms / 1000:.0f} s, longer than ttl_s "
                                    f"= {self.ttl_s}: the TTL is in seconds.")
            if client.calls["KEYS"] or client.calls["FLUSHDB"] or client.calls["FLUSHALL"]:
                raise Incorrect("Cache-aside needs GET and SET only, never KEYS or FLUSH.")

    def model_answer(self):
        return ("def cached(client, key, ttl_s, compute):\n"
                "    raw = client.get(key)\n"
                "    if raw is not None:\n"
                "        return json.loads(raw)\n"
                "    value = compute()\n"
                "    client.set(key, json.dumps(value), ex=ttl_s)\n"
                "    return value")


# --------------------------------------------------------------------------------------------
# 05.q4: a key with the record's version


@dataclass
class _Record:
    table: str
    id: int
    version: int
    updated_at: datetime
    name: str

    def bumped(self) -> _Record:
        return _Record(self.table, self.id, self.version + 1,
                       self.updated_at + timedelta(seconds=1, microseconds=250), self.name + "!")


def _records() -> list[_Record]:
    rng = random.Random(5004)
    base = datetime(2025, 3, 1, 12, 0, 0)
    out = []
    for table in ("products", "users", "orders"):
        for _ in range(4):
            out.append(_Record(table, rng.randint(1, 99_999), rng.randint(1, 40),
                               base + timedelta(seconds=rng.randint(0, 10**7),
                                                microseconds=rng.randint(0, 999_999)),
                               "A name with spaces " * rng.randint(1, 20)))
    out.append(_Record("users", out[0].id, out[0].version, out[0].updated_at, out[0].name))
    return out


class _KeyCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("05.q4", record_cache_key)')
        records = _records()
        seen: dict[str, _Record] = {}
        for record in records:
            key = call_learner(answer, record)
            if not isinstance(key, str):
                raise Incorrect(f"Return the key as a string (got a {type_name(key)}).")
            if not key.startswith("ch05:"):
                raise Incorrect(f"{short_repr(key, 50)} is outside the chapter's namespace: "
                                "start every key with \"ch05:\".")
            if any(c.isspace() for c in key) or len(key) > 120:
                raise Incorrect(f"{short_repr(key, 60)} holds spaces or is very long: build it "
                                "from the table, id and version only, never from free text.")
            same = _Record(record.table, record.id, record.version, record.updated_at,
                           record.name)
            if call_learner(answer, same) != key:
                raise Incorrect("The same record gave two different keys: the key must depend "
                                "only on what identifies this version of the record.")
            if key in seen and seen[key] != record:
                other = seen[key]
                raise Incorrect(
                    f"Two records share the key {short_repr(key, 50)}: {other.table} "
                    f"{other.id} and {record.table} {record.id}. Include the table and the id.")
            seen[key] = record
            newer = call_learner(answer, record.bumped())
            if newer == key:
                raise Incorrect(
                    f"After {record.table} {record.id} changed (version {record.version} -> "
                    f"{record.version + 1}) the key stayed {short_repr(key, 50)}: readers "
                    "would get the old fragment. Put the version (or updated_at) in the key.")

    def model_answer(self):
        return ('def record_cache_key(record):\n'
                '    return f"ch05:{record.table}/{record.id}-v{record.version}"')


# --------------------------------------------------------------------------------------------
# 05.q5: an invalidation hook on ORM events


def _shop_memory_engine():


    engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                              connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    return engine


class _HookCheck(Checker):
    products = 12

    def grade(self, answer):


        need_function(answer, 'check("05.q5", make_invalidation_hook)')
        rng = random.Random(5005)
        engine = _shop_memory_engine()
        with Session(engine) as session:
            session.add(Category(id=1, name="grader"))
            for i in range(1, self.products + 1):
                session.add(Product(id=i, category_id=1, name=f"p{i}",
                                    price=Decimal(rng.randint(100, 9999)) / 100, active=True))
            session.commit()
        with _PrivateRedis() as redis_:
            def key_for(product_id):
                return f"{redis_.prefix}product:{product_id}"

            hook = call_learner(answer, redis_.client, key_for)
            if not callable(hook):
                raise Incorrect("make_invalidation_hook must return the listener function "
                                f"(got a {type_name(hook)}).")
            events = ("after_update", "after_insert", "after_delete")
            for name in events:
                sa.event.listen(Product, name, hook)
            try:
                stale, lost = call_learner(self._scenario, engine, redis_.client, key_for, rng)
            finally:
                for name in events:
                    sa.event.remove(Product, name, hook)
                engine.dispose()
        if stale:
            raise Incorrect(f"{stale} reads after an update returned the old price: the hook "
                            "must delete the changed product's key (key_for(target.id)).")
        if lost:
            raise Incorrect(f"{lost} products that did not change lost their cached entry: "
                            "delete only the key of the product the event is about.")

    def _scenario(self, engine, client, key_for, rng):


        def read(session, pid):
            def load():
                product = session.get(Product, pid)
                return str(product.price)

            return cached(client, key_for(pid), 300, load)

        stale = lost = 0
        ids = list(range(1, self.products + 1))
        for _round in range(3):
            with Session(engine) as session:
                for pid in ids:
                    read(session, pid)
            changed = rng.sample(ids, 3)
            with Session(engine) as session:
                for pid in changed:
                    product = session.get(Product, pid)
                    product.price = product.price + Decimal("1.25")
                session.commit()
            lost += sum(client.exists(key_for(pid)) == 0 for pid in ids if pid not in changed)
            with Session(engine) as session:
                for pid in ids:
                    truth = str(session.get(Product, pid).price)
                    stale += read(session, pid) != truth
        return stale, lost

    def model_answer(self):
        return ("def make_invalidation_hook(client, key_for):\n"
                "    def hook(mapper, connection, target):\n"
                "        client.delete(key_for(target.id))\n"
                "    return hook")


# --------------------------------------------------------------------------------------------
# 05.q6: delete_pattern with SCAN


class _DeletePatternCheck(Checker):
    matching = 1500
    others = 300

    def grade(self, answer):
        need_function(answer, 'check("05.q6", delete_pattern)')
        with _PrivateRedis() as redis_:
            fill_keys(redis_.client, redis_.prefix + "session:", self.matching)
            fill_keys(redis_.client, redis_.prefix + "user:", self.others)
            fill_keys(redis_.client, redis_.prefix + "sessions-archive:", 20)
            client = CountingRedis(redis_.client)
            result = call_learner(answer, client, redis_.prefix + "session:*")
            calls = client.calls
            for forbidden in ("KEYS", "FLUSHDB", "FLUSHALL"):
                if calls[forbidden]:
                    raise Incorrect(
                        f"Your function sent {forbidden}: it blocks the whole server (or wipes "
                        "it). Walk the keyspace with SCAN (client.scan_iter(match=...)).")
            if not calls["SCAN"]:
                raise Incorrect("Your function never sent SCAN: iterate with "
                                "client.scan_iter(match=pattern, count=...).")
            left = redis_.keys()
            matching_left = sum(1 for k in left if k.startswith(
                (redis_.prefix + "session:").encode()))
            others_left = len(left) - matching_left
            if matching_left:
                raise Incorrect(f"{matching_left} matching keys are still there: delete every "
                                "key SCAN returns.")
            if others_left != self.others + 20:
                raise Incorrect(f"{self.others + 20 - others_left} keys that do not match the "
                                "pattern were deleted too: use match=pattern.")
            deletions = calls["DEL"] + calls["UNLINK"] + calls["PIPELINE"]
            budget = math.ceil(self.matching / 50) + 1
            if deletions > budget:
                raise Incorrect(
                    f"All deleted, but with {deletions} round trips for {self.matching} keys: "
                    "collect the keys in batches and delete each batch with one DEL (or UNLINK) "
                    "call.")
            if result != self.matching:
                raise Incorrect(f"Return the number of keys deleted ({self.matching} here), not "
                                f"{short_repr(result, 30)}.")

    def model_answer(self):
        return ("def delete_pattern(client, pattern, batch=500):\n"
                "    deleted, keys = 0, []\n"
                "    for key in client.scan_iter(match=pattern, count=batch):\n"
                "        keys.append(key)\n"
                "        if len(keys) == batch:\n"
                "            deleted += client.delete(*keys)\n"
                "            keys = []\n"
                "    if keys:\n"
                "        deleted += client.delete(*keys)\n"
                "    return deleted")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="05.q1",
        title="How do you implement caching? (interview question 3)",
        checker=MultiChoice(
            options={
                "a": "Fragment caching: rendered pieces of templates, keyed by record id and "
                "version",
                "b": "Low-level cache-aside: expensive results in Redis with a TTL",
                "c": "HTTP caching: ETag and Last-Modified, answered with 304 Not Modified",
                "d": "A shared external store (Redis) that every app process and server reads",
                "e": "Cache every query result forever and never delete anything",
                "f": "A Python dict in each gunicorn worker as the place where counters live",
            },
            correct={"a", "b", "c", "d"},
            explanations={
                "e": "Without expiry or invalidation a cache serves stale data and grows "
                "without bound: every entry needs a TTL, a versioned key or a delete on change.",
                "f": "Each worker process has its own dict: counts split between workers and "
                "vanish on restart. Shared counters belong in Redis (INCR).",
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
                "c": "Meaningful, bounded keys: namespace, kind, id, version",
                "d": "A TTL on every entry, chosen from how stale the data may be",
                "e": "Warm the cache for hot keys before traffic arrives",
                "f": "Delete key patterns with KEYS in production",
                "g": "Put raw user input (search text) into keys as is",
            },
            correct={"a", "b", "c", "d", "e"},
            explanations={
                "f": "KEYS walks every key of the server in one command and blocks all other "
                "clients meanwhile: use SCAN with MATCH and COUNT.",
                "g": "Raw input makes unbounded, unsafe keys (spaces, huge strings, endless "
                "variants): normalise it and use a digest.",
            },
        ),
        explanation="Levels, invalidation, keys, TTLs and warming are the guide's five points; "
        "SCAN and digests keep the cache itself from becoming the bottleneck.",
    ),
    Question(
        id="05.q3",
        title="Cache-aside with a TTL",
        checker=_CachedCheck(),
        explanation="GET first; only a miss (None) computes, then SET with the TTL. Testing "
        "`if raw:` would treat a cached 0 or [] as a miss and hit the database every time.",
        hints=("raw = client.get(key); if raw is not None: return json.loads(raw); otherwise "
               "compute, client.set(key, json.dumps(value), ex=ttl_s), return the value.",),
    ),
    Question(
        id="05.q4",
        title="A cache key with the record's version",
        checker=_KeyCheck(),
        explanation="Namespace + table + id + version (Rails `cache_key_with_version`): a change "
        "makes a new key, the old entry is never read again and expires by itself. No free text, "
        "so keys stay short and safe.",
        hints=('An f-string: "ch05:" then the table, the id and the version, with separators.',),
    ),
    Question(
        id="05.q5",
        title="Invalidate on ORM events",
        checker=_HookCheck(),
        explanation="A mapper event receives (mapper, connection, target); deleting the key of "
        "`target.id` makes the next read a miss that loads the new row. Deleting more (a whole "
        "pattern) is also fresh but throws hits away.",
        hints=("def hook(mapper, connection, target): client.delete(key_for(target.id))",),
        time_limit=20.0,
    ),
    Question(
        id="05.q6",
        title="Pattern delete with SCAN",
        checker=_DeletePatternCheck(),
        explanation="scan_iter walks the keyspace in slices (the server serves others in "
        "between); batching the deletes keeps round trips at one per batch, not one per key.",
        hints=("for key in client.scan_iter(match=pattern, count=500): collect; every 500 keys "
               "call client.delete(*batch); return the total deleted.",),
        time_limit=20.0,
    ),
    Question(
        id="05.q7",
        title="Stampede at expiry",
        checker=Choice(
            options={
                "a": "A lost update: use INCR instead of GET and SET",
                "b": "A cache stampede: let one request recompute under a lock (SET NX PX) or "
                "refresh early at random, while the others wait or serve the old value",
                "c": "Cache penetration: cache the misses of ids that do not exist",
                "d": "Too short a TTL: set it ten times longer and the problem is gone",
            },
            correct="b",
            explanations={
                "a": "Nothing is counted here: hundreds of requests rebuild the same value at "
                "once.",
                "c": "The key exists in the database; it just expired for everyone at once.",
                "d": "A longer TTL makes the stampede rarer, not smaller: at expiry every "
                "request still misses together.",
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
                "a": "Cache-Control: no-store",
                "b": "Cache-Control: public, max-age=31536000, immutable",
                "c": "Cache-Control: no-cache, with an ETag",
                "d": "Cache-Control: private, max-age=60",
            },
            correct="b",
            explanations={
                "a": "no-store forbids caching: every page view downloads the file again.",
                "c": "no-cache makes every use a revalidation round trip; right for the plain "
                "name, wasted on a name that changes with the content.",
                "d": "private keeps CDNs out and 60 s forces frequent refetches of a file that "
                "can never change under this name.",
            },
        ),
        explanation="app.3f2a9c1b.css can never change: new content gets a new name. So caches "
        "(browsers, CDNs) may keep it a year without asking again; `immutable` even skips the "
        "revalidation on reload.",
    ),
]
