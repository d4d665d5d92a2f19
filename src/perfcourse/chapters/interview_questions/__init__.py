"""Chapter 10, the ten interview questions: the lesson's harness (this module) and the capstone
lab's app (:mod:`.capstone`)."""

from __future__ import annotations

__all__: list[str] = []
