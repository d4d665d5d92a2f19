"""Private data for checkers: copies of the tiny dataset the learner's code cannot reach."""

from __future__ import annotations

import sqlite3


def private_dataset(indexes: tuple[str, ...] = ()):
    """A fresh in-memory SQLite copy of the tiny dataset (seeded first if missing).

    Checkers run learner code against it: nothing the learner does reaches the course's data,
    and ``indexes`` (CREATE INDEX statements) prepare the schema a question starts from.
    """
    import sqlalchemy as sa
    from sqlalchemy.pool import StaticPool

    from perfcourse import db
    from perfcourse.seed import seed_dataset

    source = db.engine("sqlite", scale="tiny")
    seed_dataset(source, "tiny", progress=False)
    source.dispose()
    memory = sqlite3.connect(":memory:", check_same_thread=False)
    disk = sqlite3.connect(db.sqlite_path(db.namespace_for("tiny")))
    try:
        disk.backup(memory)
    finally:
        disk.close()
    for ddl in indexes:
        memory.execute(ddl)
    memory.commit()
    engine = sa.create_engine("sqlite://", creator=lambda: memory, poolclass=StaticPool)
    engine.perfcourse_namespace = "grader_memory"
    return engine
