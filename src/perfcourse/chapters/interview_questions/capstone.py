"""Chapter 10's capstone lab, "the slow shop": an app with problems planted across the course."""

from __future__ import annotations

__all__: list[str] = []
