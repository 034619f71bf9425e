"""Stacked expert layers vs the plain per-expert loop: forward + backward time, printed as JSON.

    .venv/bin/python benchmarks/expert_layers.py [--tokens 1024] [--repeats 7] [--device cpu|cuda]

Shape: SmolLM2-135M's up projection (576 -> 1536), ranks 16/8, the router stage (routers train,
gradients flow through every expert). Results are recorded in docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from modula_ray.experts import reference_forward, wrap_linear


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for method in ("molora", "modula_flan", "modula_res"):
        for n in (2, 4, 8):
            layer = wrap_linear(nn.Linear(args.d_in, args.d_out), method, n).to(args.device)
            layer.set_stage("router")
            x = torch.randn(args.tokens, args.d_in, device=args.device, requires_grad=True)
            stacked = timed(lambda: layer(x).sum().backward(), args.repeats, args.device)
            loop = timed(lambda: reference_forward(layer, x).sum().backward(), args.repeats, args.device)
            results.append({"method": method, "experts": n, "stacked_ms": round(stacked * 1e3, 3),
                            "loop_ms": round(loop * 1e3, 3), "speedup": round(loop / stacked, 2),
                            "stacked_tokens_per_s": round(args.tokens / stacked)})
    print(json.dumps({"benchmark": "expert_layers", "device": args.device, "tokens": args.tokens,
                      "shape": [args.d_in, args.d_out], "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "machine": platform.machine(), "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
