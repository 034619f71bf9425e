"""A mixed workload against the Ray Serve endpoint, against HF ``generate`` of the base model. Prints JSON.

    .venv/bin/python benchmarks/bench_serve.py RUN [RUN ...] [--requests 96] [--concurrency 16]
        [--max-batch-size 16] [--memory-runs RUN ...] [--out docs/results/bench_serve.json]

The RUN folders (compositions over one base) and their base model alone are served at once by one
replica of ``modula_ray.serve.app`` on an in-process Ray, on 127.0.0.1. The workload, seeded:
every request targets one of the served models in turn, with a prompt from one of the runs' domains
(and general) cut to a length drawn log-uniformly from ``--prompt-tokens`` (16..512) and a
``max_tokens`` drawn uniformly from ``--output-tokens`` (8..128); ``ignore_eos``, so every path
produces exactly the tokens asked for. ``--concurrency`` clients stream (closed loop: each sends
its next request when one ends), after ``--warmup`` uncounted requests.

``serve_mixture``      the workload as drawn: the compositions and the base model at once
``serve_base``         the same prompts, all to the base model, on the same endpoint
``hf_generate_base``   ``model.generate`` of the base model on the same prompts, in arrival order,
                       batched statically by ``--concurrency`` (left padding; a batch runs to its
                       longest ``max_tokens``, and each row counts the tokens it asked for)

Each reports tokens/s (completion tokens over the phase's wall), and the Serve phases p50/p99
latency and time to first token (the first streamed chunk). ``memory`` (with ``--memory-runs``):
the resident memory of a process holding the base and 1, 2, 4 compositions, loaded the way a
replica loads them (``serve.hotplug.load``: one base, adapters per composition).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
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


def workload(manifests: list, names: list[str], tokenizer, args) -> list[dict]:
    """``args.requests + args.warmup`` requests: ``{model, prompt (token ids), max_tokens, domain}``."""
    from modula_ray.data.build import read_datasets_json, split_file
    from modula_ray.data.schema import read_split

    texts: dict[str, list[str]] = {}
    for manifest in manifests:
        data_dir = manifest["data"]["dir"]
        for domain in read_datasets_json(data_dir)["domains"]:
            rows = read_split(split_file(data_dir, domain, args.split))
            texts.setdefault(domain, [])
            texts[domain] += [p + " " + r for p, r in zip(rows.column("prompt").to_pylist(),
                                                          rows.column("response").to_pylist())]
    domains, rng = sorted(texts), random.Random(args.seed)
    low, high = args.prompt_tokens
    requests = []
    for i in range(args.requests + args.warmup):
        domain = domains[i % len(domains)]
        length = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer(rng.choice(texts[domain])).input_ids
        requests.append({"model": names[i % len(names)], "prompt": ids[:length], "domain": domain,
                         "max_tokens": rng.randint(*args.output_tokens)})
    return requests


def throughput(tokens: int, wall: float) -> dict:
    return {"tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 3), "completion_tokens": tokens}


def stream(url: str, body: dict, timeout: float) -> tuple[int, float, float | None, int]:
    """``(status, latency s, time to first chunk s, completion tokens)`` of one streamed request."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start, first, tokens = time.perf_counter(), None, 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if "error" in chunk:
                    return 500, time.perf_counter() - start, first, 0
            status = response.status
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - start, None, 0
    except OSError:
        return 0, time.perf_counter() - start, None, 0
    return status, time.perf_counter() - start, first, tokens


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"p50_s": None, "p99_s": None}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50_s": round(cuts[49], 3), "p99_s": round(cuts[98], 3)}


def load_test(url: str, requests: list[dict], args, model: str | None = None) -> dict:
    """Closed loop: ``args.concurrency`` clients, each sends its next request when one ends; the
    first ``args.warmup`` requests are sent (and waited for) before the clock starts."""
    def send(item: dict):
        body = {"model": model or item["model"], "prompt": item["prompt"], "max_tokens": item["max_tokens"],
                "temperature": 0, "ignore_eos": True}
        return stream(url, body, args.timeout)

    with ThreadPoolExecutor(args.concurrency) as pool:
        warm = list(pool.map(send, requests[:args.warmup]))
        log(f"warm-up: statuses {[w[0] for w in warm]}")
        start = time.perf_counter()
        results = list(pool.map(send, requests[args.warmup:]))
        wall = time.perf_counter() - start
    answered = [r for r in results if r[0] == 200]
    return {**throughput(sum(r[3] for r in results), wall), "latency": quantiles([r[1] for r in answered]),
            "time_to_first_token": quantiles([r[2] for r in answered if r[2] is not None]),
            "requests": len(results), "errors": len(results) - len(answered),
            "statuses": sorted({r[0] for r in results})}


def replica_threads(cpus: int) -> int:
    """torch threads in a Ray worker holding the replica's CPUs (Ray sets OMP_NUM_THREADS from them)."""
    import ray

    @ray.remote(num_cpus=cpus)
    def threads() -> int:
        import torch
        return torch.get_num_threads()

    return ray.get(threads.remote(), timeout=120)


def hf_generate_base(base_folder: str, requests: list[dict], batch: int) -> dict:
    """Static batches of ``batch`` in arrival order; a batch generates up to its longest ``max_tokens``
    (EOS ignored, like the served requests) and counts, per row, the tokens it asked for."""
    import torch

    from modula_ray.models import load_base

    model, tokenizer = load_base(base_folder)

    def generate(chunk: list[dict]) -> int:
        width = max(len(item["prompt"]) for item in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, item in enumerate(chunk):
            ids[row, width - len(item["prompt"]):] = torch.tensor(item["prompt"])
            mask[row, width - len(item["prompt"]):] = 1
        new = max(item["max_tokens"] for item in chunk)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return sum(item["max_tokens"] for item in chunk)

    generate(requests[:1])  # warm-up
    start = time.perf_counter()
    tokens = sum(generate(requests[i:i + batch]) for i in range(0, len(requests), batch))
    return throughput(tokens, time.perf_counter() - start)


def resident_memory(runs: list[str]) -> dict:
    """RSS (MiB) of a fresh process (this script, ``--memory-only``) with the base alone, then with 1, 2,
    4 of ``runs`` loaded as a replica loads them (``serve.hotplug.load``)."""
    import subprocess

    done = subprocess.run([sys.executable, __file__, *runs, "--memory-only"], capture_output=True, text=True,
                          check=True, env=os.environ | OFFLINE)
    return json.loads(done.stdout)


def measure_memory(runs: list[str]) -> dict:
    from modula_ray.serve.hotplug import load

    def rss() -> float:
        gc.collect()
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    before = rss()
    held = [load(base_of(runs[0]), is_run=False)]
    out = {"process_before_mib": round(before, 1), "base_alone_mib": round(rss(), 1), "compositions": {}}
    for count, run in enumerate(runs, start=1):
        held.append(load(run, is_run=True))
        if count in (1, 2, 4):
            out["compositions"][str(count)] = round(rss(), 1)
    return out


def base_of(run: str) -> str:
    from modula_ray.compose import Manifest

    return Manifest.read(run).check_base()


def ratio(a: dict, b: dict) -> float | None:
    return round(a["tokens_per_s"] / b["tokens_per_s"], 3) if b["tokens_per_s"] else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs", nargs="+", help="finished run folders over one base model")
    parser.add_argument("--requests", type=int, default=96, help="measured requests")
    parser.add_argument("--concurrency", type=int, default=16, help="clients (and the static baseline's batch)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=(8, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--max-batch-size", type=int, default=16, help="ServeArgs.max_batch_size (running rows)")
    parser.add_argument("--warmup", type=int, default=4, help="uncounted requests first")
    parser.add_argument("--seed", type=int, default=0, help="of the workload")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val", help="which rows prompts come from")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout (s)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="logical CPUs given to Ray")
    parser.add_argument("--replica-cpus", type=float, default=os.cpu_count(),
                        help="ray_actor_options.num_cpus of the replica (its torch threads follow)")
    parser.add_argument("--memory-runs", nargs="*", default=[], help="4 run folders for the memory figures")
    parser.add_argument("--memory-only", action="store_true", help="print the memory figures of RUN... and stop")
    parser.add_argument("--out", help="also write the JSON here (atomically)")
    args = parser.parse_args(argv)
    if args.memory_only:
        print(json.dumps(measure_memory(args.runs)))
        return 0
    stdout = os.fdopen(os.dup(1), "w")  # the JSON's alone: Ray's own messages on fd 1 go to stderr
    os.dup2(2, 1)

    import ray
    import torch
    from ray import serve
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from modula_ray.compose import Manifest
    from modula_ray.fileio import atomic_write_json
    from modula_ray.serve.app import build_app

    runs = [Path(r).resolve() for r in args.runs]
    manifests = [Manifest.read(r) for r in runs]
    bases = {m.check_base() for m in manifests}
    if len(bases) != 1:
        raise SystemExit(f"the runs are over different base models: {sorted(bases)}")
    base_folder, base_name = bases.pop(), manifests[0]["base_model"]["name"]
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    names = [r.name for r in runs] + [base_name]
    requests = workload(manifests, names, tokenizer, args)
    app = build_app([str(r) for r in runs], base_models=[base_name], max_batch_size=args.max_batch_size,
                    max_queued_requests=max(32, args.concurrency), request_timeout_s=args.timeout,
                    deployment={"ray_actor_options": {"num_cpus": args.replica_cpus}})

    ray.init(num_cpus=args.cpus, log_to_driver=False, include_dashboard=False, runtime_env={"env_vars": OFFLINE})
    try:
        threads = replica_threads(args.replica_cpus)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        log(f"serving {names} on 127.0.0.1:{port} (replica torch threads: {threads})")
        serve.run(app, name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        mixture = load_test(url, requests, args)
        log(f"serve_mixture: {json.dumps(mixture)}")
        alone = load_test(url, requests, args, model=base_name)
        log(f"serve_base: {json.dumps(alone)}")
    finally:
        serve.shutdown()
        ray.shutdown()

    torch.set_num_threads(threads)
    base = hf_generate_base(base_folder, requests[args.warmup:], args.concurrency)
    log(f"hf_generate_base: {json.dumps(base)}")
    memory = resident_memory(args.memory_runs) if args.memory_runs else None
    log(f"memory: {json.dumps(memory)}")
    measured = requests[args.warmup:]
    report = {"benchmark": "bench_serve", "command": "python " + " ".join(sys.argv),
              "machine": {"cpus": os.cpu_count(), "ray_cpus": args.cpus, "platform": platform.platform(),
                          "torch": torch.__version__, "ray": ray.__version__, "replica_torch_threads": threads,
                          "baseline_torch_threads": torch.get_num_threads()},
              "served": names, "base_model": base_name,
              "methods": {r.name: m["method"] for r, m in zip(runs, manifests)},
              "settings": {"requests": args.requests, "concurrency": args.concurrency,
                           "prompt_tokens": list(args.prompt_tokens), "output_tokens": list(args.output_tokens),
                           "max_batch_size": args.max_batch_size, "replica_cpus": args.replica_cpus,
                           "warmup": args.warmup, "seed": args.seed, "split": args.split, "temperature": 0,
                           "ignore_eos": True, "timeout_s": args.timeout},
              "workload": {"prompt_tokens": sum(len(r["prompt"]) for r in measured),
                           "completion_tokens": sum(r["max_tokens"] for r in measured),
                           "per_model": {n: sum(r["model"] == n for r in measured) for n in names},
                           "domains": sorted({r["domain"] for r in measured})},
              "serve_mixture": mixture, "serve_base": alone, "hf_generate_base": base, "memory_mib": memory,
              "ratios": {"serve_vs_hf_generate_base": ratio(mixture, base),
                         "serve_base_vs_hf_generate_base": ratio(alone, base),
                         "serve_vs_serve_base": ratio(mixture, alone)}}
    print(json.dumps(report, indent=2), file=stdout, flush=True)
    if args.out:
        atomic_write_json(args.out, report, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
