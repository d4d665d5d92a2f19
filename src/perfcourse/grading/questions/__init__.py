"""The question bank, one module per chapter: ``ch00.py``, ``ch01.py``, ... (a chapter whose lab
has its own author may keep the lab's questions in ``chNN_lab.py``).

Each module defines ``QUESTIONS``, a list of :class:`perfcourse.grading.Question` whose ids start
with the module's chapter number. Every module here is loaded by
:func:`perfcourse.grading.load_bank`; nothing else needs registering. Reference solutions and
hidden-input generators stay private to the module (names starting with ``_``).
"""

__all__: list[str] = []
