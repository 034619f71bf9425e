"""Stage 2 on Ray Train: two domain experts at once vs alone vs one after another. Prints JSON.

    python benchmarks/bench_stage2.py --out docs/results/bench_stage2.json
    python benchmarks/bench_stage2.py --method mode --out docs/results/bench_stage2_mode.json

Tiny random Llama (``jobs/configs/tiny.yaml``), N=2 domain experts (math, code) over one
frozen universal expert (``modula_res``; with ``--method mode``: two MoDE experts, each a copy of
both decoder layers, no universal), on an in-process Ray with ``--cpus`` logical CPUs (default: the
machine's cores). Each repeat runs, interleaved:

``alone``       each expert by itself, 1 worker x 1 CPU, 1 torch thread
``concurrent``  both experts at once, each 1 worker x 1 CPU, 1 torch thread
``sequential``  both experts one after another, each 1 worker x 2 CPUs, 2 torch threads

Times are taken inside the workers (first to last optimizer step, ``train_s``) and, separately,
around ``trainer.fit()`` (``fit_wall_s``: start-up, model load and tokenising included).
Ratios (medians over repeats; below 1 means the concurrent run is faster):

``concurrent_vs_alone``       each expert's training seconds when both share the machine, over the
                              same expert alone on the same 1 CPU (1.0 = no contention)
``concurrent_vs_sequential``  critical path of the concurrent pair over the sum of the two
                              sequential 2-CPU runs (training seconds; and fit wall seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
DOMAINS = ("math", "code")


METHOD = {"modula_res": [], "mode": ["method=mode", "experts.mode_blocks=[[0, 2]]"]}


def pinned(cpus: int, steps: int, batch: int, method: str = "modula_res") -> list[str]:
    return METHOD[method] + [f"stages.experts.steps={steps}", f"stages.experts.batch_size={batch}",
            f"stages.experts.log_every={steps}", f"stages.experts.checkpoint_every={steps}",
            f"stages.experts.scaling.resources_per_worker={{CPU: {cpus}}}",
            f"stages.experts.scaling.torch_threads={cpus}"]


def experts(base: Path, work: Path, name: str, overrides: list[str], domain: str | None) -> dict[str, dict]:
    """Train stage 2 (one domain, or all at once) in a fresh copy of ``base``; the ledger records."""
    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.train.pipeline import run_stage

    run_dir = work / name
    shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns("ray", "logs"))
    config = load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml", overrides)
    manifest = run_stage(config, run_dir, "experts", domain, force=True)
    records = [r for r in manifest["ledger"] if r["stage"] == "experts"]
    shutil.rmtree(run_dir)
    return {r["domain"]: r for r in records[-(1 if domain else len(DOMAINS)):]}


def window(records: list[dict], start: str, end: str) -> float:
    return round(max(r[end] for r in records) - min(r[start] for r in records), 3)


def one_repeat(base: Path, work: Path, index: int, steps: int, batch: int, method: str) -> dict:
    alone = {}
    for domain in DOMAINS:
        alone.update(experts(base, work, f"alone-{domain}-{index}", pinned(1, steps, batch, method), domain))
    both = experts(base, work, f"concurrent-{index}", pinned(1, steps, batch, method), None)
    sequential = {}
    for domain in DOMAINS:
        sequential.update(experts(base, work, f"sequential-{domain}-{index}", pinned(2, steps, batch, method), domain))
    pair = list(both.values())
    return {
        "alone_train_s": {d: alone[d]["train_s"] for d in DOMAINS},
        "concurrent_train_s": {d: both[d]["train_s"] for d in DOMAINS},
        "sequential_train_s": {d: sequential[d]["train_s"] for d in DOMAINS},
        "concurrent_critical_train_s": window(pair, "train_started_at", "train_ended_at"),
        "concurrent_fit_wall_s": window(pair, "fit_started_at", "fit_ended_at"),
        "sequential_total_train_s": round(sum(sequential[d]["train_s"] for d in DOMAINS), 3),
        "sequential_total_fit_wall_s": round(sum(sequential[d]["fit_wall_s"] for d in DOMAINS), 3),
        "startup_s": {"alone": round(statistics.mean(alone[d]["startup_s"] for d in DOMAINS), 3),
                      "concurrent": round(statistics.mean(both[d]["startup_s"] for d in DOMAINS), 3),
                      "sequential": round(statistics.mean(sequential[d]["startup_s"] for d in DOMAINS), 3)},
        "tokens": {d: alone[d]["tokens"] for d in DOMAINS},
        "trainable_params": {d: alone[d]["trainable_params"] for d in DOMAINS},
        "concurrent_windows_overlap_s": round(min(r["train_ended_at"] for r in pair)
                                              - max(r["train_started_at"] for r in pair), 3),
    }


def summarise(repeats: list[dict]) -> dict:
    med = statistics.median
    slowdown = [med(r["concurrent_train_s"][d] / r["alone_train_s"][d] for r in repeats) for d in DOMAINS]
    return {
        "concurrent_vs_alone": round(statistics.mean(slowdown), 3),
        "concurrent_vs_alone_per_domain": {d: round(s, 3) for d, s in zip(DOMAINS, slowdown)},
        "concurrent_vs_sequential_train": round(med(r["concurrent_critical_train_s"] / r["sequential_total_train_s"]
                                                    for r in repeats), 3),
        "concurrent_vs_sequential_fit_wall": round(med(r["concurrent_fit_wall_s"] / r["sequential_total_fit_wall_s"]
                                                       for r in repeats), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="also write the JSON here (atomically)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per expert")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="logical CPUs given to Ray")
    parser.add_argument("--method", choices=sorted(METHOD), default="modula_res")
    args = parser.parse_args(argv)

    import ray

    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.fileio import atomic_write_json
    from modula_ray.train.pipeline import run_stage

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-stage2-") as tmp:
        work = Path(tmp)
        base = work / "base"
        config = load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml", METHOD[args.method])
        if "universal" in config.plan:  # stage 2 trains over it
            run_stage(config, base, "universal")
        else:  # nothing to train first: the data and the manifest
            from modula_ray.train.pipeline import open_run

            open_run(config, base, command="bench_stage2")
        repeats = []
        for index in range(args.repeats):
            repeats.append(one_repeat(base, work, index, args.steps, args.batch_size, args.method))
            print(f"repeat {index + 1}/{args.repeats}: {json.dumps(repeats[-1])}", file=sys.stderr, flush=True)
    ray.shutdown()
    import torch

    report = {"benchmark": "bench_stage2", "command": "python " + " ".join(sys.argv),
              "machine": {"cpus": os.cpu_count(), "ray_cpus": args.cpus, "platform": platform.platform(),
                          "torch": torch.__version__, "ray": ray.__version__},
              "model": f"tiny-llama (hidden 64, 2 layers), {args.method}, 2 domain experts", "method": args.method,
              "steps": args.steps, "batch_size": args.batch_size, "repeats": repeats,
              "ratios": summarise(repeats), "elapsed_s": round(time.time() - started, 1)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
