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
    if args.routing_report:
        from ..compose import format_routing, routing_by_domain

        print(f"\nmean routing weight per expert, {args.routing_report} validation prompts per domain:")
        print(format_routing(routing_by_domain(args.out, rows=args.routing_report)))
    return 0


def cmd_stage(args) -> int:
    from .pipeline import run_stage

    config = _config(args)
    _print_manifest(run_stage(config, args.out, args.stage, args.domain, force=args.force,
                              command=args.command or _command_line()))
    return 0


def cmd_add_domain(args) -> int:
    from .pipeline import add_domain

    _print_manifest(add_domain(args.name, args.run, force=args.force, command=args.command or _command_line()))
    return 0


def cmd_cost(args) -> int:
    from ..compose import read_manifest
    from .ledger import compare, event_cost, format_ledger

    manifest = read_manifest(args.run)
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
        other = read_manifest(args.against)
        theirs = event_cost(other["ledger"], event)
        report.update(against=args.against, against_method=other["method"], baseline=theirs,
                      ratios=compare(mine, theirs))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"\n{event} ({manifest['method']}): trainable params x tokens {mine['params_x_tokens']:.3e}, "
          f"wall {mine['wall_s']:.1f}s, worker {mine['worker_s']:.1f}s")
    if args.against:
        r = report["ratios"]
        print(f"{event} ({other['method']}, {args.against}): trainable params x tokens "
              f"{theirs['params_x_tokens']:.3e}, wall {theirs['wall_s']:.1f}s, worker {theirs['worker_s']:.1f}s")
        print(f"pluggability (params x tokens) ratio {r['params_x_tokens_ratio']:.4f}; "
              f"wall-second ratio {r['wall_ratio']:.3f}; worker-second ratio {r['worker_ratio']:.3f}")
    return 0


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
    train.add_argument("--routing-report", type=int, default=0, metavar="N",
                       help="afterwards, print the mean gates on N validation prompts of each domain")
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
    _common(add, config=False)
    add.set_defaults(func=cmd_add_domain)

    cost = commands.add_parser("cost", help="print the cost ledger and the add-domain comparison",
                               description="Print the ledger. For the latest add-domain event: trainable params x "
                                           "tokens (the paper's pluggability metric), wall and worker seconds; "
                                           "with --against, the ratios to the same event in another run "
                                           "(e.g. a molora retrain).")
    cost.add_argument("run")
    cost.add_argument("--against", help="another run folder with the same add-domain event (the baseline)")
    cost.add_argument("--event", help="ledger event, default: the latest add-domain:*")
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(func=cmd_cost)
