"""Shared start of every job script: the uploaded package first on sys.path, then ``modula-ray``'s
``main`` (which sets the offline environment, ``modula_ray.ray_session.OFFLINE_ENV``)."""
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` uploads it


def run(subcommand: str) -> int:
    """Run ``modula-ray <subcommand> ARGS``, recording the job's own command line in config.yaml."""
    from modula_ray.cli import main

    argv = sys.argv[1:]
    if "-h" not in argv and "--help" not in argv:
        argv += ["--command", "python " + " ".join(shlex.quote(a) for a in sys.argv)]
    return main([subcommand, *argv])
