"""The one call at the top of every notebook: backend, dataset, plot style, readable errors."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from .config import default_scale
from .db import backend_of, check_connection, engine
from .errors import install_notebook_handler
from .seed import seed_dataset

__all__ = [
    "dataset",
    "say",
    "setup",
]


def setup(backend: str = "sqlite", scale: str | None = None, *, quiet: bool = False) -> Engine:
    """Prepare a notebook: course plot style, short error messages, a seeded dataset.

    Returns the engine of the dataset (seeding it first when missing or stale, with a progress
    bar). ``backend`` is ``"sqlite"`` (default, always available) or ``"postgres"``.
    """
    from . import plots  # noqa: PLC0415 - matplotlib is slow to import; only notebooks need it

    install_notebook_handler()
    plots.use_course_style()
    _table_display()
    return dataset(backend, scale, quiet=quiet)


def _table_display() -> None:
    """Tables print on one line per row, never wrapped at 80 columns: where pandas wraps depends
    on the width of the values, so a timing that grew a digit would move the break (and fail the
    notebook checks, which compare outputs line by line)."""
    import pandas as pd  # noqa: PLC0415 - perfcourse is imported by gunicorn and RQ workers: keep it light

    pd.set_option("display.expand_frame_repr", False)
    pd.set_option("display.max_columns", 30)


def dataset(backend: str = "sqlite", scale: str | None = None, *, quiet: bool = False) -> Engine:
    """An engine on the shop dataset of ``backend``, seeded first when missing or stale."""
    scale = scale or default_scale()
    eng = engine(backend, scale=scale)
    if backend_of(eng) == "postgres":  # a SQLite file is checked (and rebuilt if damaged) by seeding
        check_connection(eng)
    counts = seed_dataset(eng, scale)
    if not quiet:
        print(
            f"{backend_of(eng)} dataset '{scale}' ready: {counts['users']:,} users, "
            f"{counts['orders']:,} orders, {counts['order_items']:,} order items"
        )
    return eng


def say(text: str) -> None:
    """Show a sentence of measured prose as Markdown under a plot.

    Numbers in the course's prose come from the run: build ``text`` with an f-string of measured
    values, formatted with units (``units.format_duration``, ``format_ratio``,
    ``format_bytes``) so nbval's sanitizer masks what varies between runs.
    """
    from IPython.display import Markdown, display  # noqa: PLC0415 - IPython is slow to import; only notebooks need it

    display(Markdown(text))
