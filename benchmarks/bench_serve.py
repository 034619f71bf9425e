"""Mixed-domain traffic against the Ray Serve endpoint vs in-process generation. Prints JSON.

    .venv/bin/python benchmarks/bench_serve.py [RUN_DIR] [--requests 64] [--concurrency 8] [--max-tokens 32]
        [--max-batch-size 8] [--out docs/results/bench_serve.json]

RUN_DIR (default ``runs/demo``) is served by ``modula_ray.serve.app.build_app`` on an in-process
Ray (``--cpus`` logical CPUs). Prompts are the run's own ``--split`` rows of every domain (and
general), interleaved round-robin. ``--concurrency`` client threads send ``--requests`` greedy
``POST /v1/completions`` after a few warm-up requests. Then, with Serve shut down and torch on the
replica's thread count, the same prompts and ``max_tokens``, in batches of ``--concurrency``:

``serve``               tokens/s (completion tokens / wall of the measured phase), p50/p99 latency
``in_process_mixture``  ``generate_batch`` over ``load_composition(RUN_DIR)``: no HTTP, no Serve
``hf_generate_base``    ``model.generate`` of the base model alone (left padding, greedy); tokens
                        counted per row up to and including the first EOS, as a server returns them
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE)
log = partial(print, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mixed_prompts(manifest: dict, tokenizer, window: int, args) -> tuple[list[str], list[str]]:
    """``args.requests`` prompts from the run's own rows (those ``eval`` reads), domains round-robin;
    rows whose tokens plus ``max_tokens`` overflow the context (``window``) are left out."""
    from modula_ray.data.build import read_datasets_json, split_file
    from modula_ray.data.schema import read_split

    data_dir = manifest["data"]["dir"]
    built = read_datasets_json(data_dir)["domains"]
    domains = [d for d in list(manifest["domains"]) + ["general"] if d in built]
    rows = {d: [p for p in read_split(split_file(data_dir, d, args.split)).column("prompt").to_pylist()
                if len(tokenizer(p).input_ids) + args.max_tokens <= window] for d in domains}
    domains = [d for d in domains if rows[d]]
    picked = []
    for i in range(args.requests):
        domain = domains[i % len(domains)]
        picked.append(rows[domain][(i // len(domains)) % len(rows[domain])])
    return picked, domains


def throughput(tokens: int, wall: float) -> dict:
    return {"tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 3), "completion_tokens": tokens}


def post(url: str, body: dict, timeout: float) -> tuple[int, float, int]:
    """``(status, latency s, completion tokens)`` of one request; status 0 for no answer at all."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer, status = json.loads(response.read()), response.status
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - start, 0
    except OSError:
        return 0, time.perf_counter() - start, 0
    return status, time.perf_counter() - start, answer["usage"]["completion_tokens"] if status == 200 else 0


def load_test(url: str, model: str, prompts: list[str], args) -> dict:
    """Closed loop: ``args.concurrency`` threads, each sends its next request when one returns."""
    def send(prompt: str) -> tuple[int, float, int]:
        body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
        return post(url, body, args.timeout)

    with ThreadPoolExecutor(args.concurrency) as pool:
        warm = list(pool.map(send, prompts[:args.warmup]))
        log(f"warm-up: statuses {[s for s, _, _ in warm]}")
        start = time.perf_counter()
        results = list(pool.map(send, prompts))
        wall = time.perf_counter() - start
    latencies = [lat for status, lat, _ in results if status == 200]  # answered requests only
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {**throughput(sum(t for _, _, t in results), wall),
            "p50_s": round(cuts[49], 3) if cuts else None, "p99_s": round(cuts[98], 3) if cuts else None,
            "requests": len(results), "errors": sum(status != 200 for status, _, _ in results),
            "statuses": sorted({status for status, _, _ in results})}


def replica_threads(cpus: int) -> int:
    """torch threads in a Ray worker holding the replica's CPUs (Ray sets OMP_NUM_THREADS from them)."""
    import ray

    @ray.remote(num_cpus=cpus)
    def threads() -> int:
        import torch
        return torch.get_num_threads()

    return ray.get(threads.remote(), timeout=120)


def in_process_mixture(run_dir: Path, prompts: list[str], batch: int, max_tokens: int) -> dict:
    from modula_ray.compose import load_composition
    from modula_ray.serve.generation import GenerationRequest, generate_batch

    model, tokenizer = load_composition(run_dir)
    requests = [GenerationRequest(tokenizer(p).input_ids, max_tokens=max_tokens) for p in prompts]
    generate_batch(model, tokenizer, [GenerationRequest(requests[0].prompt_ids, max_tokens=2)])  # warm-up
    start = time.perf_counter()
    tokens = sum(r.completion_tokens for i in range(0, len(requests), batch)
                 for r in generate_batch(model, tokenizer, requests[i:i + batch]))
    return throughput(tokens, time.perf_counter() - start)


def hf_generate_base(base_folder: str, prompts: list[str], batch: int, max_tokens: int) -> dict:
    import torch

    from modula_ray.models import load_base

    model, tokenizer = load_base(base_folder)
    tokenizer.padding_side = "left"
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])} - {None}

    def generate(chunk: list[str], new: int) -> int:
        inputs = tokenizer(chunk, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        count = 0
        for row in out[:, inputs.input_ids.shape[1]:].tolist():
            ends = [i for i, token in enumerate(row) if token in eos]
            count += ends[0] + 1 if ends else len(row)
        return count

    generate(prompts[:1], 2)  # warm-up
    start = time.perf_counter()
    tokens = sum(generate(prompts[i:i + batch], max_tokens) for i in range(0, len(prompts), batch))
    return throughput(tokens, time.perf_counter() - start)


def ratio(a: dict, b: dict) -> float | None:
    return round(a["tokens_per_s"] / b["tokens_per_s"], 3) if b["tokens_per_s"] else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs/demo"), help="a finished run folder")
    parser.add_argument("--requests", type=int, default=64, help="measured requests")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (and the baselines' batch)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8, help="ServeArgs.max_batch_size")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted requests first")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val", help="which rows to prompt with")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout (s)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="logical CPUs given to Ray")
    parser.add_argument("--replica-cpus", type=float, default=os.cpu_count(),
                        help="ray_actor_options.num_cpus of the replica (its torch threads follow)")
    parser.add_argument("--out", help="also write the JSON here (atomically)")
    args = parser.parse_args(argv)
    stdout = os.fdopen(os.dup(1), "w")  # the JSON's alone: Ray's own messages on fd 1 go to stderr
    os.dup2(2, 1)

    import ray
    import torch
    from ray import serve
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from modula_ray.compose import Manifest
    from modula_ray.fileio import atomic_write_json
    from modula_ray.serve.app import build_app

    run_dir = Path(args.run_dir).resolve()
    manifest = Manifest.read(run_dir)
    base_folder = manifest.check_base()
    hf_logging.disable_progress_bar()
    tokenizer, config = AutoTokenizer.from_pretrained(base_folder), AutoConfig.from_pretrained(base_folder)
    window = getattr(config, "max_position_embeddings", None) or float("inf")  # what the server checks
    prompts, domains = mixed_prompts(manifest, tokenizer, window, args)
    app = build_app([str(run_dir)], max_batch_size=args.max_batch_size,
                    deployment={"ray_actor_options": {"num_cpus": args.replica_cpus}})

    ray.init(num_cpus=args.cpus, log_to_driver=False, include_dashboard=False, runtime_env={"env_vars": OFFLINE})
    try:
        threads = replica_threads(args.replica_cpus)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        log(f"serving {run_dir.name} on 127.0.0.1:{port} (replica torch threads: {threads})")
        serve.run(app, name="bench", route_prefix="/")
        served = load_test(f"http://127.0.0.1:{port}/v1/completions", run_dir.name, prompts, args)
        log(f"serve: {json.dumps(served)}")
    finally:
        serve.shutdown()
        ray.shutdown()

    torch.set_num_threads(threads)
    mixture = in_process_mixture(run_dir, prompts, args.concurrency, args.max_tokens)
    log(f"in_process_mixture: {json.dumps(mixture)}")
    base = hf_generate_base(base_folder, prompts, args.concurrency, args.max_tokens)
    log(f"hf_generate_base: {json.dumps(base)}")

    report = {"benchmark": "bench_serve", "command": "python " + " ".join(sys.argv),
              "machine": {"cpus": os.cpu_count(), "ray_cpus": args.cpus, "platform": platform.platform(),
                          "torch": torch.__version__, "ray": ray.__version__, "replica_torch_threads": threads,
                          "baseline_torch_threads": torch.get_num_threads()},
              "run": run_dir.name, "base_model": manifest["base_model"]["name"], "method": manifest["method"],
              "experts": list(manifest["domains"]),
              "settings": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                           "max_batch_size": args.max_batch_size, "replica_cpus": args.replica_cpus, "warmup": args.warmup, "split": args.split,
                           "prompt_domains": domains, "temperature": 0, "timeout_s": args.timeout},
              "serve": served, "in_process_mixture": mixture, "hf_generate_base": base,
              "ratios": {"serve_vs_hf_generate_base": ratio(served, base),
                         "in_process_mixture_vs_hf_generate_base": ratio(mixture, base),
                         "serve_vs_in_process_mixture": ratio(served, mixture)}}
    print(json.dumps(report, indent=2), file=stdout, flush=True)
    if args.out:
        atomic_write_json(args.out, report, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
