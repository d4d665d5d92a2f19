"""Chapter 09, common performance issues: the harness of its experiments and the detectors a
learner takes home."""

from __future__ import annotations

__all__: list[str] = []
