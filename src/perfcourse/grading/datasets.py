"""Private data for checkers: what the learner's code runs against, never the course's own.

``private_dataset`` is an in-memory copy of the tiny shop dataset; :class:`PrivateRedis` is the
course's Redis under a fresh key prefix, emptied when the check ends.
"""

from __future__ import annotations

import uuid

from perfcourse.errors import BackendUnavailable
from perfcourse.scratch import memory_copy
from perfcourse.services import redis_client

from .checkers import Incorrect

__all__ = [
    "private_dataset",
    "PrivateRedis",
]


def private_dataset(indexes: tuple[str, ...] = ()):
    """A fresh in-memory SQLite copy of the tiny dataset (seeded first if missing).

    Checkers run learner code against it: nothing the learner does reaches the course's data,
    and ``indexes`` (CREATE INDEX statements) prepare the schema a question starts from.
    """
    return memory_copy("tiny", indexes)


class PrivateRedis:
    """The course's Redis with a fresh key prefix ``<label>:<run>:``; its keys go on exit.

    Subclasses clean up more in :meth:`cleanup` (RQ queues named after :attr:`run`, say). A
    Redis that cannot be reached fails the check with one sentence, as a wrong answer would.
    """

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        try:
            self.client = redis_client()
        except BackendUnavailable as exc:
            raise Incorrect(f"This check needs Redis and cannot reach it. {exc}") from None
        self.run = uuid.uuid4().hex[:10]
        self.prefix = f"{self.label}:{self.run}:"
        return self

    def keys(self, pattern: str | None = None) -> list[bytes]:
        return list(self.client.scan_iter(match=pattern or self.prefix + "*", count=1000))

    def delete_matching(self, pattern: str) -> None:
        keys = self.keys(pattern)
        for start in range(0, len(keys), 500):
            self.client.delete(*keys[start:start + 500])

    def cleanup(self) -> None:
        self.delete_matching(self.prefix + "*")

    def __exit__(self, *exc_info):
        try:
            self.cleanup()
        finally:
            self.client.close()
