"""``modula-ray train | stage | add-domain | cost`` (the jobs/ scripts call the same functions)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys


def _config(args):
    from ..config import PipelineConfig, load_config

    return load_config(PipelineConfig, args.config, args.set)


def _command_line() -> str:
    return "modula-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _print_manifest(manifest: dict) -> None:
    from .ledger import format_ledger

    print(f"\nmethod {manifest['method']}, domains {list(manifest['domains'])}, run id {manifest['run_id']}")
    print(format_ledger(manifest["ledger"]))


def cmd_train(args) -> int:
    from .pipeline import run_pipeline

    config = _config(args)  # every config error surfaces here, before any Ray work
    _print_manifest(run_pipeline(config, args.out, force=args.force, command=args.command or _command_line()))
    return 0


def cmd_stage(args) -> int:
    from .pipeline import run_stage

    config = _config(args)
    _print_manifest(run_stage(config, args.out, args.stage, args.domain, force=args.force,
                              command=args.command or _command_line()))
    return 0


def cmd_add_domain(args) -> int:
    from .pipeline import add_domain

    _print_manifest(add_domain(args.name, args.run, force=args.force, command=args.command or _command_line(),
                               overrides=args.set))
    return 0


def cmd_cost(args) -> int:
    from ..compose import Manifest
    from .ledger import compare, event_cost, format_ledger

    manifest = Manifest.read(args.run)
    events = [r["event"] for r in manifest["ledger"] if r["event"].startswith("add-domain:")]
    report = {"run": args.run, "method": manifest["method"]}
    if not args.json:
        print(format_ledger(manifest["ledger"]))
    if not events:
        print("\nno add-domain in this run's ledger", file=sys.stderr)
        return 0 if not args.against else 2
    event = args.event or events[-1]
    mine = event_cost(manifest["ledger"], event)
    report["add_domain"] = mine
    if args.against:
        other = Manifest.read(args.against)
        theirs = event_cost(other["ledger"], event)
        report.update(against=args.against, against_method=other["method"], baseline=theirs,
                      ratios=compare(mine, theirs))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"\n{event} ({manifest['method']}): {_cost_line(mine)}")
    if args.against:
        r = report["ratios"]
        print(f"{event} ({other['method']}, {args.against}): {_cost_line(theirs)}")
        print(f"ratios: pluggability (params x tokens) {r['params_x_tokens_ratio']:.4f}, FLOPs {r['flops_ratio']:.3f}, "
              f"training seconds {r['train_ratio']:.3f}, resource-seconds {r['resource_ratio']:.3f}, "
              f"fit wall {r['fit_wall_ratio']:.3f}")
    return 0


def _cost_line(cost: dict) -> str:
    return (f"trainable params x tokens {cost['params_x_tokens']:.3e}, {cost['flops'] / 1e12:.2f} TFLOP, "
            f"training {cost['train_s']:.1f}s (critical path, in the workers), {cost['resource_s']:.1f} "
            f"resource-s, start-up {cost['startup_s']:.1f}s, fit wall {cost['fit_wall_s']:.1f}s")


def _common(parser, *, config: bool = True) -> None:
    if config:
        parser.add_argument("--config", required=True, help="pipeline YAML (jobs/configs/*.yaml)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="dotted override, e.g. stages.router.lr=1e-3 (repeatable)")
    parser.add_argument("--force", action="store_true", help="retrain stages that are already done")
    parser.add_argument("--command", default="", help=argparse.SUPPRESS)  # recorded in config.yaml by jobs/


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="run every stage of a method into a run folder",
                                description="Build the data if needed, then run stages 1-3 (MoDULA) or the joint "
                                            "stage (lora, molora) on Ray Train.")
    _common(train)
    train.add_argument("--out", required=True, help="run folder (manifest.json, parts, tensorboard/, ray/)")
    train.set_defaults(func=cmd_train)

    stage = commands.add_parser("stage", help="run one stage of a pipeline config",
                                description="Run a single stage; its inputs must already be in the run folder.")
    _common(stage)
    stage.add_argument("--out", required=True)
    stage.add_argument("--stage", required=True, choices=["universal", "experts", "router", "joint"])
    stage.add_argument("--domain", help="stage experts: only this domain")
    stage.set_defaults(func=cmd_stage)

    add = commands.add_parser("add-domain", help="plug a new domain expert into a finished run",
                              description="Train one new domain expert over the frozen universal expert, restack "
                                          "and retrain the router. Existing experts are not touched. Against a "
                                          "molora or lora run this retrains everything (their honest cost).")
    add.add_argument("name", help="a registered domain, e.g. finance")
    add.add_argument("--run", required=True, help="the run folder")
    add.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted override of the run's config, e.g. stages.experts.scaling.torch_threads=2")
    _common(add, config=False)
    add.set_defaults(func=cmd_add_domain)

    cost = commands.add_parser("cost", help="print the cost ledger and the add-domain comparison",
                               description="Print the ledger. For the latest add-domain event: trainable params x "
                                           "tokens (the paper's pluggability metric), FLOPs, worker-side training "
                                           "seconds, resource-seconds (seconds x workers x CPUs or GPUs requested) "
                                           "and start-up; with --against, the ratios to the same event in another "
                                           "run (e.g. a molora retrain).")
    cost.add_argument("run")
    cost.add_argument("--against", help="another run folder with the same add-domain event (the baseline)")
    cost.add_argument("--event", help="ledger event, default: the latest add-domain:*")
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(func=cmd_cost)
