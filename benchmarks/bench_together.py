"""Stage 2 at the demo's scale: a worker group per expert against every expert in one group
(``stages.experts.together``, the mLoRA pattern). Prints JSON.

    python benchmarks/bench_together.py runs/diag --out docs/results/stage2-together.json

``RUN`` is a finished run of ``jobs/configs/demo.yaml`` (its universal expert and data are reused;
the run itself is not changed). In a fresh copy of it, stage 2 is trained twice on one in-process
Ray with ``--cpus`` logical CPUs, with the run's own settings (steps, batch, lr):

``per_group``  today's default: one worker group per domain, all at once, each with
               ``--group-cpus`` CPUs and 1 torch thread (demo.yaml: 4 x 0.5 CPU)
``together``   one worker group with every expert, ``--together-cpus`` CPUs and as many threads

Per mode: the stage's wall (first ``fit()`` start to last end), its critical training window,
start-up, tokens and tokens/s over the wall, and each expert's first and last loss, from the
ledger and manifest. Ratios: together over per-group (below 1: together is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def stage2(run: Path, work: Path, name: str, overrides: list[str]) -> dict:
    """Stage 2 of a copy of ``run`` with ``overrides``; its ledger records and each domain's metrics."""
    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.train.pipeline import run_stage

    copy = work / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("ray", "logs", "tensorboard", "data", "eval"))
    config = load_config(PipelineConfig, copy / "config.yaml", [f"data.dir={run / 'data'}", *overrides])
    manifest = run_stage(config, copy, "experts", force=True)
    records = [r for r in manifest["ledger"] if r["stage"] == "experts" and r["event"] == "pipeline"]
    records = records[-(1 if config.stages.experts.together else len(config.domains)):]
    domains = {d: {k: manifest["domains"][d]["metrics"].get(k) for k in ("first_loss", "loss", "tokens")}
               for d in config.domains}
    for record in records:  # a group per expert: its record holds the losses
        if record["domain"]:
            domains[record["domain"]].update(first_loss=record["first_loss"], loss=record["final_loss"])
    wall = max(r["fit_ended_at"] for r in records) - min(r["fit_started_at"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {"groups": len(records), "wall_s": round(wall, 1),
            "train_window_s": round(max(r["train_ended_at"] for r in records)
                                    - min(r["train_started_at"] for r in records), 1),
            "startup_s": [round(r["startup_s"], 1) for r in records],
            "startup_phases": [r.get("startup_phases") for r in records],
            "tokens": tokens, "tokens_per_s_over_wall": round(tokens / wall, 1), "domains": domains}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run", type=Path, help="a finished demo.yaml run (read only)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="logical CPUs given to Ray")
    parser.add_argument("--group-cpus", type=float, default=0.5)
    parser.add_argument("--together-cpus", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="dotted.key=value for both modes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import ray

    from modula_ray.fileio import emit_json

    run = args.run.resolve()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    modes = {"per_group": [f"stages.experts.scaling.resources_per_worker={{CPU: {args.group_cpus}}}",
                           "stages.experts.scaling.torch_threads=1"],
             "together": ["stages.experts.together=true",
                          f"stages.experts.scaling.resources_per_worker={{CPU: {args.together_cpus}}}",
                          f"stages.experts.scaling.torch_threads={args.together_cpus}"]}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-together-") as tmp:
        for name, overrides in modes.items():
            results[name] = stage2(run, Path(tmp), name, [*args.set, *overrides])
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    ray.shutdown()
    mine, theirs = results["together"], results["per_group"]
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__},
              "settings": {"run": str(args.run), "cpus": args.cpus, "group_cpus": args.group_cpus,
                           "together_cpus": args.together_cpus, "set": args.set},
              "modes": results,
              "ratios": {"together_vs_per_group_wall": round(mine["wall_s"] / theirs["wall_s"], 3),
                         "together_vs_per_group_tokens_per_s": round(mine["tokens_per_s_over_wall"]
                                                                     / theirs["tokens_per_s_over_wall"], 3)}}
    return emit_json(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
