"""One training step in float32 weights against bfloat16 (the pipeline's ``dtype``), side by side.

    python benchmarks/bench_train_dtype.py --threads 1 --out docs/results/bf16-training/steps.json

SmolLM2-135M-Instruct (the embedded default, materialised offline) with modula_res at its expert
stage (one domain expert) and router stage (4 domains), and lora: forward, backward and AdamW on
4 x 128 random tokens. The configurations run interleaved, one round each after a warm-up round,
and each reports the median over ``--repeats`` rounds. Results: docs/RESULTS.md, "Training in
bfloat16". Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import time

DOMAINS = ["math", "code", "medicine", "ecommerce"]
EXPERTS = {"universal_rank": 16, "domain_rank": 8, "universal_alpha": 32, "domain_alpha": 16}
CONFIGS = [("modula_res", "experts"), ("modula_res", "router"), ("lora", "joint")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    import torch

    from modula_ray.compose import build_model
    from modula_ray.models import base_model

    torch.set_num_threads(args.threads)
    models = {}
    for method, stage in CONFIGS:
        for dtype in ("float32", "bfloat16"):
            model, _ = build_model(base_model(), method, DOMAINS[:1] if stage == "experts" else DOMAINS, EXPERTS,
                                   stage=stage, dtype=dtype)
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            models[f"{method}/{stage}/{dtype}"] = model, optimizer
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {key: [] for key in models}
    for round_ in range(args.repeats + 1):
        for key, (model, optimizer) in models.items():
            started = time.perf_counter()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:  # round 0 warms up
                times[key].append(time.perf_counter() - started)
    median = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
    result = {"threads": args.threads, "repeats": args.repeats, "step_s": {k: round(v, 3) for k, v in median.items()},
              "speedup_bf16": {f"{m}/{s}": round(median[f"{m}/{s}/float32"] / median[f"{m}/{s}/bfloat16"], 2)
                               for m, s in CONFIGS}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from modula_ray.fileio import atomic_write_json

        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
