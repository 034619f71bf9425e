"""``modula-ray data build`` and ``modula-ray data validate``."""
from __future__ import annotations

import sys


def _build(args) -> int:
    from .build import build_datasets
    from .sources import SIZES

    domains = [d for d in args.domains.split(",") if d] if args.domains else None
    manifest = build_datasets(args.size, args.seed, args.out, domains, progress=not args.quiet)
    print(f"wrote {args.out}/datasets.json (size {args.size}, seed {args.seed}, quota {SIZES[args.size]})")
    for name, entry in manifest["domains"].items():
        rows = "  ".join(f"{split} {info['rows']:>5}" for split, info in entry["splits"].items())
        print(f"  {name:<10} {rows}")
    return 0


def _validate(args) -> int:
    import pyarrow.parquet as pq

    from .schema import iter_problems

    failed = 0
    for path in args.files:
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:
            print(f"DataValidationError: {path}: not a readable Parquet file ({exc})", file=sys.stderr)
            failed += 1
            continue
        problems = list(iter_problems(table, path))
        for problem in problems[:args.max_errors]:
            print(f"{type(problem).__name__}: {problem}", file=sys.stderr)
        if len(problems) > args.max_errors:
            print(f"... and {len(problems) - args.max_errors} more", file=sys.stderr)
        if problems:
            failed += 1
        else:
            print(f"ok {path} ({table.num_rows} rows)")
    return 1 if failed else 0


def add_parser(commands) -> None:
    data = commands.add_parser("data", help="build and validate the domain datasets (Parquet)",
                               description="Offline domain datasets as Arrow/Parquet.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="build DIR/<domain>/{train,val,test}.parquet and DIR/datasets.json",
                           description="Build every domain's splits deterministically (same size and seed, "
                                       "same bytes). The folder is replaced only when the build succeeds.")
    build.add_argument("--size", choices=["tiny", "demo", "full"], default="demo",
                       help="rows per split: tiny 32/8/8, demo 192/24/24, full up to 4000/400/400")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", required=True, help="output folder (replaced atomically)")
    build.add_argument("--domains", default="", help="comma-separated subset (default: all registered)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)
    validate = sub.add_parser("validate", help="check Parquet files against the schema",
                              description="Exit 0 if every file is valid; otherwise print each problem with "
                                          "its 0-based row number and field, and exit 1.")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--max-errors", type=int, default=20)
    validate.set_defaults(func=_validate)
