"""Plug a new domain into a finished run: one new expert + router retrain (molora: retrain all).

    python jobs/add_domain.py finance --run RUN_DIR
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("add-domain"))
