"""A decode step of a replica's bank with rows of several compositions and the base model. Prints JSON.

    .venv/bin/python benchmarks/bench_bank.py RUN [RUN ...] [--rows 16] [--prompt-tokens 128]
        [--steps 16] [--repeats 5] [--threads 2] [--out docs/results/bench_bank.json]

In process, no Serve: the runs are loaded as a replica loads them (``serve.hotplug.load``: one
base, each composition in serving form over it), and one ``generation.Decoder`` over their
``bank.Bank`` holds ``--rows`` running rows, assigned in turn to each run and to the base model
alone (``mixed``), or all to the base model (``base``). After the prefill, ``--steps`` decode steps
(each picks a token for every row, then one forward) are timed. Configurations, interleaved, each
run ``--repeats`` times in turn after one uncounted round:

``base``              every row the base model's: the bank adds nothing
``mixed_union``       the mixed rows, a decode step in one ``serve.union.Union`` per projection
``mixed_per_member``  the same rows, each member's adapter on its own rows (``Bank.unite = False``)

Reports ms per decode step (median over rounds) and each configuration's ratio to ``base``
(median of the rounds' ratios); ``held_mib``: the members' adapters in serving form, and what the
bank caches from them after the rounds (``unions``: a copy of the running members' adapters).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def bank_of(runs: list[str], rows: int, prompt_tokens: int):
    """``(bank, tokenizer, {"base" | "mixed": each row's model}, prompts)``: one bank over ``runs`` and
    their base, loaded as a replica loads them."""
    import torch

    from modula_ray.compose import Manifest
    from modula_ray.serve.bank import Bank
    from modula_ray.serve.hotplug import load

    base = load(Manifest.read(runs[0]).check_base(), is_run=False)
    compositions = [load(run, is_run=True) for run in runs]
    bank = Bank(base.model)
    for loaded in compositions:
        bank.join(loaded.model)
    models = [loaded.model for loaded in compositions] + [base.model]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (prompt_tokens,), generator=generator).tolist() for _ in range(rows)]
    mixed = [models[i % len(models)] for i in range(rows)]
    return bank, base.tokenizer, {"base": [base.model] * rows, "mixed": mixed}, prompts


def held_mib(bank) -> dict:
    """MiB of the members' serving-form adapters, and of the unions the bank's projections cache from
    them (a copy of the running members' adapters)."""
    def mib(tensors) -> float:
        return round(sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2 ** 20, 1)

    adapters = [t for layers in bank.adapters.values() for layer in layers.values() for t in (layer.read, layer.up)]
    unions = [u for layer in bank.layers.values() if (u := layer._union[1]) is not None]
    return {"adapters": mib(adapters), "unions": mib(t for u in unions for t in (u.read, u.up))}


def time_steps(bank, tokenizer, owners: list, prompts: list, steps: int, unite: bool) -> float:
    """Seconds per decode step of ``owners``' rows, after their prefill."""
    from modula_ray.serve.generation import Decoder, GenerationRequest

    bank.unite = unite
    decoder = Decoder(None, tokenizer, len(owners), bank=bank)
    requests = [GenerationRequest(prompt, max_tokens=steps + 2, ignore_eos=True) for prompt in prompts]
    decoder.step(requests, owners)
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs", nargs="+", help="finished run folders over one base model")
    parser.add_argument("--rows", type=int, default=16, help="running rows (a replica's max_batch_size)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="each row's prompt (random token ids)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", help="also write the JSON here (atomically)")
    args = parser.parse_args(argv)

    import torch

    from modula_ray.fileio import atomic_write_text

    torch.set_num_threads(args.threads)
    bank, tokenizer, owners, prompts = bank_of(args.runs, args.rows, args.prompt_tokens)
    configs = {"base": ("base", True), "mixed_union": ("mixed", True), "mixed_per_member": ("mixed", False)}
    samples: dict[str, list[float]] = {name: [] for name in configs}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):
            names = list(configs)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                who, unite = configs[name]
                seconds = time_steps(bank, tokenizer, owners[who], prompts, args.steps, unite)
                if round_:
                    samples[name].append(seconds)
                print(f"round {round_} {name}: {seconds * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    result = {
        "benchmark": "bench_bank", "runs": args.runs, "rows": args.rows, "prompt_tokens": args.prompt_tokens,
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or None,
        "held_mib": held_mib(bank),
        "decode_step_ms": {name: round(statistics.median(v) * 1e3, 2) for name, v in samples.items()},
        "samples_ms": {name: [round(s * 1e3, 2) for s in v] for name, v in samples.items()},
        "ratio_to_base": {name: round(statistics.median(a / b for a, b in zip(v, samples["base"])), 3)
                          for name, v in samples.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
