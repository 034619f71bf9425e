"""``modula-ray eval RUN_DIR --suite routing`` (the evaluation issue adds more suites here)."""
from __future__ import annotations

import json

SUITES = ("routing",)


def cmd_eval(args) -> int:
    from .routing import format_routing, routing_by_domain, save_routing

    table = routing_by_domain(args.run, split=args.split, rows=args.rows, progress=not args.json)
    if not table:
        print(f"{args.run}: this composition has no router, so there is no routing table")
        return 0
    path = save_routing(args.run, table, split=args.split, rows=args.rows)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"mean routing weight per expert, {args.rows} {args.split} prompts per domain (* = largest):")
    print(format_routing(table))
    print(f"saved {path}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate a finished run folder",
                                 description="Evaluate a finished composition. Suite 'routing': the mean gate "
                                             "per routed expert on each domain's prompts, saved to "
                                             "RUN_DIR/eval/routing.json.")
    parser.add_argument("run", help="a finished run folder (holds manifest.json)")
    parser.add_argument("--suite", choices=SUITES, default="routing", help="what to evaluate (default: routing)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val",
                        help="which split's prompts (default: val)")
    parser.add_argument("--rows", type=int, default=8, help="prompts per domain (default: 8)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.set_defaults(func=cmd_eval)
