"""Chapter 10 questions."""

from __future__ import annotations

__all__ = ["QUESTIONS"]

QUESTIONS: list = []
