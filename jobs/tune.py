"""Search the router's hyperparameters over a finished run's frozen experts, install the best.

    python jobs/tune.py router --run RUN_DIR [--space jobs/configs/tune-router.yaml] [--num-samples N]
    python jobs/tune.py report RUN_DIR
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("tune"))
