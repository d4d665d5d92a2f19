"""Paths, scales and environment variables of the course, in one place.

Environment variables (all optional):

``PERFCOURSE_DATA``
    Folder for generated datasets and embedded-server state (default: ``data/`` of the checkout,
    or ``~/.perfcourse`` when the package is installed outside a checkout).
``PERFCOURSE_SCALE``
    Dataset scale the notebooks use: ``tiny``, ``small`` (default) or ``large``.
``DATABASE_URL``
    A PostgreSQL server to use instead of the embedded one.
``REDIS_URL``
    A Redis server to use instead of the embedded one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidChoice

__all__ = [
    "DATASET_SEED",
    "SCALES",
    "SCHEMA_VERSION",
    "course_root",
    "data_dir",
    "default_scale",
    "get_scale",
    "repo_root",
    "Scale",
]

#: Seed of the deterministic dataset generator.
DATASET_SEED = 20240601

#: Bumped whenever the shop schema or the generator changes; a manifest with another version
#: means the dataset is rebuilt.
SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Scale:
    """How many rows a dataset scale has (order items are about 2.5 per order)."""

    name: str
    users: int
    categories: int
    products: int
    orders: int


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", users=200, categories=10, products=100, orders=1_000),
    "small": Scale("small", users=10_000, categories=40, products=2_000, orders=100_000),
    "large": Scale("large", users=100_000, categories=100, products=20_000, orders=1_000_000),
}


def repo_root() -> Path | None:
    """The course checkout this package was installed from (editable install), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "perfcourse").is_dir():
            return parent
    return None


def course_root(start: Path | None = None) -> Path | None:
    """The course checkout a command works on: the first folder from ``start`` (default: the
    current directory) upwards that holds ``solutions/``, ``notebooks/`` or ``labs/``; else the
    checkout this package was installed from; else None."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / name).is_dir() for name in ("solutions", "notebooks", "labs")):
            return folder
    return repo_root()


def data_dir() -> Path:
    """Folder for generated data and embedded-server state; created on first use."""
    configured = os.environ.get("PERFCOURSE_DATA")
    if configured:
        path = Path(configured).expanduser()
    else:
        root = repo_root()
        path = root / "data" if root else Path.home() / ".perfcourse"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def default_scale() -> str:
    """The scale notebooks use unless told otherwise (``PERFCOURSE_SCALE``, default ``small``)."""
    scale = os.environ.get("PERFCOURSE_SCALE", "small")
    return get_scale(scale).name


def get_scale(name: str) -> Scale:
    """Look a scale up by name, with an error that lists the valid ones."""

    try:
        return SCALES[name]
    except KeyError:
        raise InvalidChoice(
            f"Unknown dataset scale {name!r}: use one of {', '.join(SCALES)}."
        ) from None
