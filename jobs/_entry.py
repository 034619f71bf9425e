"""Shared start of every job script: offline hubs, the uploaded package first on sys.path."""
import os
import shlex
import sys
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` uploads it


def run(subcommand: str) -> int:
    """Run ``modula-ray <subcommand> ARGS``, recording the job's own command line in config.yaml."""
    from modula_ray.cli import main

    argv = sys.argv[1:]
    if "-h" not in argv and "--help" not in argv:
        argv += ["--command", "python " + " ".join(shlex.quote(a) for a in sys.argv)]
    return main([subcommand, *argv])
