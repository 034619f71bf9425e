"""Run one stage of a pipeline config (its inputs must already be in the run folder).

    python jobs/train_stage.py --config jobs/configs/tiny.yaml --out RUN_DIR --stage experts --domain math
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("stage"))
