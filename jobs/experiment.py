"""The paper's comparison at small scale: every method, seeds, add a domain, tune, evaluate, report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/experiment.py paper --config jobs/configs/paper-smollm2.yaml --out /abs/path/runs/paper

Also runs without a cluster (in-process Ray). Rerun the same command to resume.
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("experiment"))
