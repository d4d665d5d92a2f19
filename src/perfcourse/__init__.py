"""perfcourse: the helper package of the web-application performance course.

Notebooks start with::

    from perfcourse import setup
    engine = setup()            # SQLite dataset, plot style, readable errors

Modules: ``config`` (paths, scales), ``db`` (engines), ``services`` (embedded PostgreSQL and
Redis), ``models`` (shop schema), ``seed`` (dataset), ``measure`` (timing, query counting,
EXPLAIN, memory), ``latency`` (delay-injecting proxy), ``plots``, ``grading``, ``doctor``.
"""

from .errors import BackendUnavailable, CourseError
from .notebook import dataset, say, setup

__all__ = ["BackendUnavailable", "CourseError", "dataset", "say", "setup"]
__version__ = "0.1.0"
