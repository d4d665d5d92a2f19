"""Reading a pyinstrument profile: which function of ours was the bottleneck."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["hottest_function"]


def hottest_function(session, module: str, *, exclude: Iterable[str] = ()) -> str:
    """The function of ``module`` where a pyinstrument ``session`` spent most time (its own
    time plus what it called), leaving out ``exclude`` (e.g. the entry point you profiled).

    ``session`` is ``profiler.last_session`` of a :class:`pyinstrument.Profiler`.
    """
    excluded = set(exclude)
    path_end = module.replace(".", "/") + ".py"
    totals: dict[str, float] = {}

    def walk(frame, on_stack: frozenset) -> None:
        name = frame.function
        mine = (frame.file_path or "").replace("\\", "/").endswith(path_end)
        if mine and name not in excluded and name not in on_stack:
            totals[name] = totals.get(name, 0.0) + frame.time
        below = on_stack | {name} if mine else on_stack
        for child in frame.children:
            walk(child, below)

    root = session.root_frame()
    if root is None:
        raise ValueError("The profile is empty: run the code inside the profiler first.")
    walk(root, frozenset())
    if not totals:
        raise ValueError(f"No function of {module} in this profile.")
    return max(totals, key=totals.get)
