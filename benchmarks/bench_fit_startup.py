"""What a Ray Train fit costs before its first step: trivial one-worker ``TorchTrainer`` fits on an
in-process Ray, timed from ``fit()`` to the first line of the train function and from its last
line to ``fit()`` returning.

    python benchmarks/bench_fit_startup.py --repeats 3 --out docs/results/fit-startup.json

Two variants, interleaved: ``plain`` (no dataset) and ``dataset`` (a 100-row Ray Dataset read in
full by the worker, as the pipeline's loop reads its split). The train function imports nothing
of this project, so the numbers are Ray Train's own floor on this machine. Test settings: Ray
Train polls its workers every 0.25 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), no preemption watcher.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def train_fn(config: dict) -> None:
    import time as clock

    started = clock.time()
    from ray import train

    if config["dataset"]:
        shard = train.get_dataset_shard("train")
        sum(batch.num_rows for batch in shard.iter_batches(batch_size=512, batch_format="pyarrow"))
    Path(config["stamp"]).write_text(json.dumps([started, clock.time()]))


def one_fit(variant: str, storage: str) -> dict:
    import ray.data
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stamp = Path(storage) / f"stamp-{time.time_ns()}.json"
    extra = {}
    if variant == "dataset":
        extra = {"datasets": {"train": ray.data.from_items([{"a": i} for i in range(100)])},
                 "dataset_config": DataConfig(datasets_to_split=[])}
    called = time.time()
    TorchTrainer(train_fn, train_loop_config={"dataset": variant == "dataset", "stamp": str(stamp)},
                 scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name=f"{variant}-{time.time_ns()}", storage_path=storage), **extra).fit()
    returned = time.time()
    started, ended = json.loads(stamp.read_text())
    return {"variant": variant, "to_train_fn_s": round(started - called, 2), "after_train_fn_s": round(returned - ended, 2),
            "fit_s": round(returned - called, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.update(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    import ray
    import ray.data

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    fits = []
    with tempfile.TemporaryDirectory() as storage:
        for _ in range(args.repeats):
            for variant in ("plain", "dataset"):
                fits.append(one_fit(variant, storage))
                print(json.dumps(fits[-1]), file=sys.stderr, flush=True)
    ray.shutdown()
    median = {v: {k: statistics.median(f[k] for f in fits if f["variant"] == v)
                  for k in ("to_train_fn_s", "after_train_fn_s", "fit_s")} for v in ("plain", "dataset")}
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__},
              "settings": {"num_workers": 1, "num_cpus": 4, "health_check_interval_s": 0.25}, "median": median,
              "fits": fits}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
