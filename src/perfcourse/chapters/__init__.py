"""One module per chapter, named after it: the harness of that chapter's experiments.

``performance_fundamentals`` (01), ``query_optimization`` (02), ``database_scaling`` (03),
``memory_and_cpu`` (04), ``caching`` (05), ``background_jobs`` (06), ``infrastructure_scaling``
(07), ``monitoring_and_profiling`` (08), ``common_performance_issues`` (09) and
``interview_questions`` (10, a subpackage: the lesson's harness and the capstone's app). Each
imports the platform (``perfcourse.*``) and never another chapter; the technique a chapter
teaches is written in its notebook's cells, not here.
"""

__all__: list[str] = []
