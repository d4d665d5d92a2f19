"""The `perfcourse` command: doctor, seed, services, export, bench, and the grading pipeline."""

from __future__ import annotations

import argparse
import sys

from .errors import CourseError


def _seed(args) -> int:
    from .db import engine  # noqa: PLC0415
    from .seed import read_manifest, seed_dataset  # noqa: PLC0415

    for backend in args.backend or ["sqlite"]:
        eng = engine(backend, scale=args.scale)
        before = read_manifest(eng)
        counts = seed_dataset(eng, args.scale, force=args.force)
        after = read_manifest(eng)
        state = "already up to date" if before == after else f"loaded in {after['load_seconds']:.1f}s"
        summary = ", ".join(f"{table} {n:,}" for table, n in counts.items())
        print(f"{backend} {after['scale']}: {state} ({summary})")
        eng.dispose()
    return 0


def _drop(args) -> int:
    from .db import drop_namespace, namespace_for  # noqa: PLC0415

    for backend in args.backend or ["sqlite"]:
        drop_namespace(backend, namespace_for(args.scale))
        print(f"{backend}: dropped {namespace_for(args.scale)}")
    return 0


def _services(args) -> int:
    from . import services  # noqa: PLC0415

    if args.action == "up":
        for name, url in services.up().items():
            print(f"{name}: {url}")
    elif args.action == "down":
        for name, was_running in services.down().items():
            print(f"{name}: {'stopped' if was_running else 'was not running'}")
    else:
        for name, line in services.status().items():
            print(f"{name}: {line}")
    return 0


def _export(args) -> int:
    from .db import engine  # noqa: PLC0415
    from .export import export_parquet  # noqa: PLC0415

    for table, path in export_parquet(engine(args.backend, scale=args.scale)).items():
        print(f"{table}: {path}")
    return 0


def _doctor(_args) -> int:
    from .doctor import main  # noqa: PLC0415

    return main()


#: Sub-commands with their own argument parsers: (module, function, help).
DELEGATED = {
    "bench": ("perfcourse.bench", "main", "seeding rate against the raw driver path"),
    "grade": ("perfcourse.grading.runner", "main_grade", "grade notebooks (save them first!)"),
    "assign": ("perfcourse.authoring", "main_assign", "generate learner notebooks from masters"),
    "outputs": ("perfcourse.authoring", "main_outputs", "re-execute masters to refresh outputs"),
}


def _delegate(name: str, argv: list[str]) -> int:
    import importlib  # noqa: PLC0415

    module, function, _ = DELEGATED[name]
    return int(getattr(importlib.import_module(module), function)(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perfcourse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("doctor", help="check this machine is ready for the course").set_defaults(run=_doctor)

    seed = commands.add_parser("seed", help="load the shop dataset (idempotent)")
    seed.add_argument("--scale", default=None, help="tiny, small (default) or large")
    seed.add_argument("--backend", action="append", choices=["sqlite", "postgres"],
                      help="repeat for both (default: sqlite)")
    seed.add_argument("--force", action="store_true", help="rebuild even when up to date")
    seed.set_defaults(run=_seed)

    drop = commands.add_parser("drop", help="delete a dataset (the next `seed` rebuilds it)")
    drop.add_argument("--scale", default=None, help="tiny, small (default) or large")
    drop.add_argument("--backend", action="append", choices=["sqlite", "postgres"],
                      help="repeat for both (default: sqlite)")
    drop.set_defaults(run=_drop)

    services = commands.add_parser("services", help="embedded PostgreSQL and Redis")
    services.add_argument("action", choices=["status", "up", "down"], nargs="?", default="status")
    services.set_defaults(run=_services)

    export = commands.add_parser("export", help="write the dataset to Parquet for DuckDB")
    export.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    export.add_argument("--scale", default=None)
    export.set_defaults(run=_export)

    for name, (_, _, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in DELEGATED:
            return _delegate(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-done was kept; run the command again.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
