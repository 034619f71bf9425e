"""``modula-ray tune router --run RUN_DIR [--space SPACE.yaml] [--num-samples N] [--max-concurrent K]``
and ``modula-ray tune report RUN_DIR`` (``jobs/tune.py`` runs the first under ``ray job submit``)."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys


def cmd_router(args) -> int:
    from .report import tune_report
    from .search import SearchInterrupted, tune_router

    command = args.command or "modula-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background: let Ctrl-C / kill -INT in
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = tune_router(args.run, args.space, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                          name=args.name, command=command)
    except SearchInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    table, figures = tune_report(args.run)
    best, router = out["best"], out["manifest"]["router"]
    print(f"\n{table}\n\ninstalled the router of trial {best['trial']} into {args.run}/router "
          f"({router['tuned']['metric']} {best[router['tuned']['metric']]:.4f}); hyperparameters in manifest.json:")
    print("  " + ", ".join(f"{k}={v}" for k, v in router["hyperparameters"].items()))
    print(f"trials: {args.run}/tune/trials.csv; figures: {', '.join(map(str, figures))}")
    print(f"TensorBoard: tensorboard --logdir {args.run}/tune")
    return 0


def cmd_report(args) -> int:
    from .report import tune_report

    table, figures = tune_report(args.run)
    print(table)
    print("figures: " + ", ".join(map(str, figures)))
    return 0


def add_parser(commands) -> None:
    tune = commands.add_parser("tune", help="search the router's hyperparameters with Ray Tune",
                               description="Ray Tune over stage 3 of a finished run: the experts stay frozen, "
                                           "only the router is trained, one TorchTrainer per trial.")
    sub = tune.add_subparsers(dest="tune_command", required=True, metavar="SUBCOMMAND")
    router = sub.add_parser("router", help="search, then install the best router into the run",
                            description="Search the router's hyperparameters (lr, temperature, top_k, load-balance "
                                        "coefficient, warm-up, steps, domain data weights, placement) over the run's "
                                        "frozen experts: ASHA by default, validation loss as the objective. Writes "
                                        "RUN/tune/trials.csv and installs the best router atomically (manifest and "
                                        "config.yaml updated). An interrupted search resumes when run again.")
    router.add_argument("--run", required=True, help="a run folder with trained experts")
    router.add_argument("--space", help="search file (default: jobs/configs/tune-router.yaml)")
    router.add_argument("--num-samples", type=int, help="trials to sample (overrides search.num_samples)")
    router.add_argument("--max-concurrent", type=int, help="trials at once (overrides search.max_concurrent)")
    router.add_argument("--name", default="router", help="the search's name: RUN/tune/NAME (default: router)")
    router.add_argument("--command", default="", help=argparse.SUPPRESS)
    router.set_defaults(func=cmd_router)
    report = sub.add_parser("report", help="print the trial table and write the figures",
                            description="Print RUN/tune/trials.csv as a table; write RUN/tune/objective.png (the "
                                        "objective against each hyperparameter) and RUN/tune/asha_curves.png.")
    report.add_argument("run", help="a run folder that was tuned")
    report.add_argument("--command", default="", help=argparse.SUPPRESS)
    report.set_defaults(func=cmd_report)
