"""Build the data if needed, then run every stage of the configured method; print the ledger.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/tiny.yaml --out /abs/path/runs/tiny

Also runs without a cluster (in-process Ray): python jobs/pipeline.py --config ... --out ...
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train"))
