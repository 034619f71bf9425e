"""``modula-ray experiment paper --config FILE --out DIR [--seeds 0,1,2]`` and ``experiment report DIR``."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

EXPERIMENT_FILE, INVOCATIONS = "experiment.yaml", "invocations.json"


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def prepare(args):
    """The experiment config (file, ``--set``, ``--seeds``), checked against a previous run into
    ``--out``, every run's pipeline config validated, and the shared data built."""
    import dataclasses

    import yaml

    from ..fileio import atomic_write_text
    from ..train.pipeline import ensure_data
    from .config import check_same_experiment, dump_experiment, load_experiment, pipeline_config

    overrides = list(args.set) + ([f"seeds=[{', '.join(map(str, args.seeds))}]"] if args.seeds else [])
    exp = load_experiment(args.config, overrides)
    out = Path(args.out).resolve()
    saved = out / EXPERIMENT_FILE
    if saved.is_file():  # the same experiment; its seeds so far stay in the plan and the report
        before = yaml.safe_load(saved.read_text())
        check_same_experiment(before, exp, saved)
        exp = dataclasses.replace(exp, seeds=list(dict.fromkeys([*before.get("seeds", []), *exp.seeds])))
    configs = [pipeline_config(exp, args.config, m, s, out / "data") for m in exp.methods for s in exp.seeds]
    first = configs[0]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, dump_experiment(exp, args.command or _command_line()))
    ensure_data(first, out / "data", exp.domains + [first.data.general_domain]
                + ([exp.add_domain] if exp.add_domain else []))
    return exp, out


def log_invocation(out: Path, entry: dict) -> None:
    """``DIR/invocations.json``: every run of the command, its wall time and the parts it ran
    (a resumed experiment's time is the sum of its invocations)."""
    from ..fileio import atomic_write_json, read_json

    path = out / INVOCATIONS
    atomic_write_json(path, [*(read_json(path) if path.is_file() else []), entry])


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _command_line() -> str:
    return "modula-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_paper(args) -> int:
    from ..ray_session import connect_ray
    from .parts import plan
    from .report import write_experiment_report
    from .runner import part_records, run_parts

    exp, out = prepare(args)
    parts = plan(exp)
    started = time.time()
    # --num-cpus above the cores keeps them busy while parts start up (a Train group holds its CPU while
    # it loads the model); per-part seconds then include sharing a core.
    connect_ray(out, num_cpus=args.num_cpus)
    # After ray.init, which installs its own SIGTERM handler: kill, Ctrl-C or SIGINT to a background
    # job stop cleanly (the caller's handlers come back when the command returns).
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    entry = {"command": args.command or _command_line(), "seeds": exp.seeds, "started_at": started}
    try:
        outcome = run_parts(parts, exp, out, Path(args.config).resolve())
    except KeyboardInterrupt:
        done = sorted(part_records(parts, out))
        log_invocation(out, {**entry, "wall_s": round(time.time() - started, 1), "interrupted": True, "done": done})
        print(f"\ninterrupted; {len(done)} of {len(parts)} parts are done and kept. Resume with the same command:\n  "
              f"{entry['command']}", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log_invocation(out, {**entry, "wall_s": round(time.time() - started, 1), "ran": outcome["ran"],
                         "failed": sorted(outcome["failed"])})
    report = write_experiment_report(exp, out, part_records(parts, out), command=args.command or _command_line())
    print(f"\nreport: {report}\nresults: {out / 'results.json'}\nfigures: "
          + ", ".join(str(p) for p in sorted(out.glob("*.png"))))
    for key, message in outcome["failed"].items():
        print(f"failed: {key}: {message}", file=sys.stderr)
    if outcome["failed"] or outcome["skipped"]:
        print(f"{len(outcome['failed'])} part(s) failed and {len(outcome['skipped'])} were skipped; the same "
              f"command reruns only those", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    import yaml

    from ..config import from_dict
    from .config import ExperimentConfig
    from .parts import plan
    from .report import write_experiment_report
    from .runner import part_records

    out = Path(args.dir).resolve()
    saved = out / EXPERIMENT_FILE
    if not saved.is_file():
        from ..errors import ArtifactError

        raise ArtifactError(saved, "not found: is this the --out folder of `modula-ray experiment paper`?")
    text = saved.read_text()
    exp = from_dict(ExperimentConfig, yaml.safe_load(text), source=str(saved))
    report = write_experiment_report(exp, out, part_records(plan(exp), out), command=text.splitlines()[0][2:])
    print(report.read_text() if args.print else report)
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("experiment", help="the paper's comparison: every method, seeds, report",
                                 description="Train, tune, extend and evaluate every method on the same data and "
                                             "token budget, as concurrent Ray tasks; then report.md, results.json "
                                             "and figures.")
    sub = parser.add_subparsers(dest="experiment_command", required=True, metavar="SUBCOMMAND")
    paper = sub.add_parser("paper", help="run (or resume) the experiment, then write its report",
                           description="base model, lora, molora, modula_flan, modula_res and mode on the "
                                       "experiment file's domains; each then gets the added domain (lora and "
                                       "molora retrain, the others add one expert and retrain the router or "
                                       "gates); the MoDULA routers are also searched with Ray Tune. Finished "
                                       "parts (DIR/parts/*.json) never run again: rerun the same command after "
                                       "a crash.")
    paper.add_argument("--config", required=True, help="experiment YAML, e.g. jobs/configs/paper-smollm2.yaml")
    paper.add_argument("--out", required=True, help="the experiment folder (report.md, results.json, runs)")
    paper.add_argument("--seeds", type=_seeds, default=None, help="comma-separated, e.g. 0,1,2 (default: the file's)")
    paper.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override of the experiment file, e.g. eval.limit=16 (repeatable)")
    paper.add_argument("--num-cpus", type=float, default=None,
                       help="in-process Ray only: its logical CPUs (default: the cores); e.g. 3 on 2 cores keeps "
                            "them busy while parts start up")
    paper.add_argument("--command", default="", help=argparse.SUPPRESS)
    paper.set_defaults(func=cmd_paper)
    report = sub.add_parser("report", help="rewrite report.md from the parts done so far",
                            description="Rewrite DIR/report.md, results.json and the figures from DIR's finished parts.")
    report.add_argument("dir", help="an experiment folder")
    report.add_argument("--print", action="store_true", help="print the report instead of its path")
    report.add_argument("--command", default="", help=argparse.SUPPRESS)
    report.set_defaults(func=cmd_report)
