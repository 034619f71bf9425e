"""``modula-ray`` command line. Each command imports what it needs (Ray only where used)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module adds its subcommands with ``add_parser(commands)`` and imports heavy things lazily.
COMMAND_MODULES = ["modula_ray.data.commands", "modula_ray.train.commands", "modula_ray.evaluation.commands",
                   "modula_ray.serve.commands", "modula_ray.tune.commands",
                   "modula_ray.experiment.commands"]


def _cmd_base_model(args) -> int:
    from .models import base_fingerprint, base_model

    folder = base_model(args.name)
    print(folder)
    print(f"sha256 {base_fingerprint(folder)}", file=sys.stderr)
    return 0


def _evaluate_in_task(run_dir: str, args) -> dict:
    """One run folder's evaluation inside a Ray task: what it printed, and where it ran."""
    import contextlib
    import io

    import ray

    from .ray_session import use_offline_env

    use_offline_env()  # a cluster node's worker may lack the driver's environment
    from .evaluation.commands import evaluate_run

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate_run(run_dir, args)
    return {"run": run_dir, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "printed": printed.getvalue()}


def _eval_on_cluster(args) -> int:
    """``modula-ray eval RUN RUN ...`` with ``RAY_ADDRESS`` set: each run folder is evaluated by its
    own Ray task (``--cpus-per-run`` each), spread over the cluster's nodes."""
    import ray

    from .evaluation.commands import side_by_side
    from .ray_session import connect_ray

    connect_ray()
    task = ray.remote(_evaluate_in_task).options(num_cpus=args.cpus_per_run, scheduling_strategy="SPREAD")
    options = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    for done in ray.get([task.remote(str(run_dir), options) for run_dir in args.runs]):
        print(done["printed"], end="")
        print(f"{done['run']}: evaluated by a Ray task on node {done['node']} (pid {done['pid']})")
    side_by_side(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modula-ray", description="Mixtures of LoRA experts on Ray: "
                                     "MoDULA (universal + domain experts + router), trained in stages on Ray Train.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    base = commands.add_parser("base-model", help="materialise a base model into the cache; print its folder",
                               description="Materialise a registered base model (offline) and print its folder.")
    base.add_argument("name", nargs="?", default="smollm2-135m", help="smollm2-135m | tiny-llama | tiny-qwen2")
    base.set_defaults(func=_cmd_base_model)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import ModulaError
    from .ray_session import use_offline_env

    use_offline_env()  # first: huggingface_hub reads it once, when a command imports transformers
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval" and len(args.runs) > 1 and os.environ.get("RAY_ADDRESS"):
            return _eval_on_cluster(args)
        return args.func(args)
    except ModulaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
