"""perfcourse: the helper package of the web-application performance course.

Notebooks start with::

    from perfcourse import setup
    engine = setup()            # SQLite dataset, plot style, readable errors

The package has floors, and imports only go down (``make lint`` holds this with import-linter)::

    tooling    cli > authoring | bench | doctor        the `perfcourse` command, masters -> learners
    grading    grading (bank, checkers, runner, questions/chNN)   keyed NN.qK, public names only
    chapters   chapters.performance_fundamentals | query_optimization | database_scaling |
               memory_and_cpu | caching | background_jobs | infrastructure_scaling
               (one module per chapter, each independent of the others)
    platform   notebook                                setup(), dataset(), say()
               plots | export | proxy | scratch | web | profiler
               seed | load                             the dataset; the load generator
               db                                      engines, namespaces, scales
               models | services                       the shop schema; PostgreSQL and Redis
               replicas | timing | statements | explain | memory
               units | stats | locks | net             formatting, percentiles, locks, ports
               config > errors

A chapter module holds the harness of its experiments (servers, threads, tables); the technique
it teaches is written in the notebook. Anything two chapters need lives on the platform, once.
"""

from .errors import BackendUnavailable, CourseError
from .notebook import dataset, say, setup

__all__ = ["BackendUnavailable", "CourseError", "dataset", "say", "setup"]
__version__ = "0.1.0"
