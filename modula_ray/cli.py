"""``modula-ray`` command line. Each command imports what it needs (Ray only where used)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module adds its subcommands with ``add_parser(commands)`` and imports heavy things lazily.
COMMAND_MODULES = ["modula_ray.data.commands", "modula_ray.train.commands", "modula_ray.evaluation.commands",
                   "modula_ray.serve.commands"]


def _cmd_base_model(args) -> int:
    from .models import base_fingerprint, base_model

    folder = base_model(args.name)
    print(folder)
    print(f"sha256 {base_fingerprint(folder)}", file=sys.stderr)
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

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModulaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
