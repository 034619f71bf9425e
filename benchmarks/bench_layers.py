"""Mixtures of LoRA experts against peft LoRA r16, side by side in one process: a full training step
(forward, backward, AdamW on the trainable parameters) per configuration, and on CUDA inference too.

    python benchmarks/bench_layers.py --device cpu --out docs/results/bench_layers_cpu.json
    python benchmarks/bench_layers.py --device cuda --out docs/results/bench_layers_cuda.json

Needs only torch, transformers and peft (plus this repository's ``modula_ray.experts``): the models
are random-weight models of real shapes, so nothing is downloaded. Every configuration shares one set
of frozen base weights; the configurations run interleaved (the order rotates each round) after a
warm-up, and each row reports the median over ``--repeats`` rounds. Results: docs/PERFORMANCE.md.

``base`` is the frozen model's forward plus the backward a LoRA needs (activation gradients down to
the first layer, no weight gradients): the floor every adapter pays. FLOPs per token are
``4 N + 2 N_train + 12 L d T`` (N: parameters in the forward; attention by the PaLM convention, no
causal halving); ``mfu`` divides the achieved FLOP/s by the peak: the device's bf16 dense peak on
CUDA, a large fp32 matmul measured in this process on CPU (``machine.peak_flops``).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import modula_ray.experts  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOMAINS = ["math", "code", "medicine", "ecommerce"]
SHAPES = {  # LlamaConfig fields; smollm2-135m is the embedded default's own config
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_parameters={"rope_theta": 100000.0,
                                                                        "rope_type": "default"}),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),  # the script's own test
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096),
}
DEFAULT_RUNS = {  # device -> [(shape, seq, batch)]
    "cpu": [("smollm2-135m", 256, 4), ("smollm2-135m", 1024, 1)],  # 4 x 1024 with 7 models: > 24 GiB
    "cuda": [("smollm2-135m", 256, 4), ("smollm2-135m", 1024, 4), ("llama2-7b", 512, 4), ("llama2-7b", 2048, 1),
             ("smollm2-1.7b", 2048, 4)],
}
METHODS = ["base", "peft_lora", "lora", "molora", "modula_flan", "modula_res", "mode"]
SERVABLE = ["lora", "molora", "modula_flan", "modula_res"]  # experts/serving.py
OURS = METHODS[2:]
# glibc returns freed blocks above 32 MiB to the OS and faults them in again on the next step: a
# quarter of a CPU step, and +-15% noise between rounds. Keeping freed memory in the heap removes both.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
                     "MALLOC_TOP_PAD_": str(1 << 30)}


def keep_freed_memory() -> None:
    """Re-run this process with ``KEEP_FREED_MEMORY`` set (glibc reads it at start-up), once."""
    if any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | KEEP_FREED_MEMORY)


BF16_PEAK = [("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12),
             ("L4", 121e12)]  # dense bf16 FLOP/s, the first name found in the device's name wins


def build_base(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False).train()


@functools.lru_cache(maxsize=None)
def experts_at(rev: str):
    """``modula_ray.experts`` as committed at git revision ``rev``, imported beside today's as the
    package ``modula_ray_at_<rev>``: the same process times both (``--against``)."""
    import importlib
    import io
    import subprocess
    import tarfile
    import tempfile

    root = Path(__file__).resolve().parents[1]
    try:
        archive = subprocess.run(["git", "archive", rev, "modula_ray"], cwd=root, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"--against {rev}: git archive failed: {getattr(error, 'stderr', b'').decode().strip()}")
    folder, name = Path(tempfile.mkdtemp(prefix="bench_layers_")), f"modula_ray_at_{rev.replace('-', '_')}"
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(folder, filter="data")
    (folder / "modula_ray").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{name}.experts")


def configure(method: str, base, stage: str | None, experts=modula_ray.experts, fused_adamw: bool = True):
    """A model of ``method`` over ``base``'s frozen weights (shared, not copied) and its AdamW (fused,
    as modula-ray's training engine uses it, unless ``fused_adamw`` is False); ``experts`` is the
    ``modula_ray.experts`` package whose layers it uses."""
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    model.experts_package = experts
    if method == "base":
        model.enable_input_require_grads()  # backward through every layer, no weight gradients
        return model, None
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    else:
        experts.inject(model, method, ["all"] if method == "lora" else DOMAINS, target_modules=TARGETS)
        if stage:
            experts.set_stage(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw)


def compiled(model):
    """``torch.compile`` of the model's forward (the first call, in the warm-up, compiles)."""
    model.forward = torch.compile(model.forward)
    return model


def parameter_counts(model, method: str) -> tuple[int, int]:
    """(N in the forward, N trainable)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method in ("base", "peft_lora"):
        n = sum(p.numel() for p in model.parameters())  # the tied embedding counts once, as the head
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is None or head.weight is not emb.weight:
            n -= emb.weight.numel()
        return n, trainable
    return model.experts_package.forward_parameter_count(model), trainable


def train_step(model, optimizer, batch, autocast):
    with autocast():
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        if optimizer is not None:
            loss = loss + 0.01 * model.experts_package.load_balancing_loss(model).to(loss.device)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def prefill_and_decode(model, batch, autocast, steps: int):
    """(prefill seconds, seconds per decode step over ``steps`` greedy steps) with the KV cache."""
    with autocast():
        start = time.perf_counter()
        out = model(input_ids=batch, use_cache=True)
        sync(batch.device)
        mid = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        sync(batch.device)
    return mid - start, (time.perf_counter() - mid) / steps


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: str) -> tuple[float, str]:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK if k in name), None)
        return (peak, f"{name} dense bf16 peak") if peak else (float("nan"), f"{name}: unknown peak")
    a = torch.randn(2048, 2048)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * 2048 ** 3 / min(times), "fastest of 20 fp32 2048^3 matmuls, before and after the runs, in this process"


def bench_shape(shape, seq, batch_size, methods, args, peak):
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    autocast = ((lambda: torch.autocast("cuda", torch.bfloat16)) if device == "cuda"
                else (lambda: torch.autocast("cpu", enabled=False)))
    base = build_base(shape, dtype, device)
    cfg = base.config
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq), device=device, generator=None)
    models, rows, errors = {}, {}, {}
    configs = [(m, modula_ray.experts) for m in methods] + [
        (f"{m}@{args.against}", experts_at(args.against)) for m in methods if args.against and m in OURS]
    for method, experts in configs:
        try:
            model, optimizer = configure(method.split("@")[0], base, args.stage if method not in ("base", "peft_lora")
                                         else None, experts, fused_adamw=args.adamw == "fused")
            models[method] = (compiled(model) if args.compile else model), optimizer
        except torch.OutOfMemoryError as error:
            errors[method] = f"out of memory while building: {str(error).splitlines()[0]}"
    samples = {m: [] for m in models}
    for round_ in range(args.warmup + args.repeats if args.train else 0):
        order = list(models)[round_ % len(models):] + list(models)[:round_ % len(models)]
        for method in order:
            if method in errors:
                continue
            model, optimizer = models[method]
            try:
                sync(device)
                start = time.perf_counter()
                train_step(model, optimizer, batch, autocast)
                sync(device)
            except torch.OutOfMemoryError as error:  # recorded as a row; its memory goes back to the others
                errors[method] = f"out of memory in the step: {str(error).splitlines()[0]}"
                del model, optimizer, models[method]
                torch.cuda.empty_cache()
                continue
            if round_ >= args.warmup:
                samples[method].append(time.perf_counter() - start)
            print(f"  {shape} seq {seq} round {round_ + 1}/{args.warmup + args.repeats} {method}: "
                  f"{(time.perf_counter() - start) * 1e3:.0f} ms", file=sys.stderr, flush=True)
    tokens = batch.numel()
    for method, (model, _) in models.items():
        if method in errors or not samples[method]:
            continue
        step = statistics.median(samples[method])
        n, n_train = parameter_counts(model, method.split("@")[0])
        flops = tokens * (4 * n + 2 * n_train + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq)
        rows[method] = {"method": method, "phase": "train", "stage": None if method in ("base", "peft_lora")
                        else args.stage, "compiled": args.compile, "shape": shape, "seq": seq, "batch": batch_size,
                        "step_ms": round(step * 1e3, 2), "tokens_per_s": round(tokens / step, 1),
                        "trainable_params": n_train, "forward_params": n,
                        "samples_ms": [round(s * 1e3, 2) for s in samples[method]],
                        "mfu": round(flops / step / peak, 4)}
    if args.inference:  # interleaved like the training rounds: every round runs each model once
        live = [m for m in models if m not in errors]
        for method in live:
            models[method][0].eval()
        if args.serving:  # the form a Serve replica decodes with (experts/serving.py), unfolded and folded
            from modula_ray.experts.serving import serving_form

            for method in [m for m in live if m in SERVABLE]:
                for fold in (False, True):
                    served = configure(method, base, args.stage)[0].eval()
                    models[f"{method}/{'folded' if fold else 'served'}"] = serving_form(served, fold=fold), None
            live = list(models)
        timings = {m: [] for m in live}
        for round_ in range(args.warmup + args.repeats):
            for method in live[round_ % len(live):] + live[:round_ % len(live)]:
                timing = prefill_and_decode(models[method][0], batch, autocast, args.decode_steps)
                if round_ >= args.warmup:
                    timings[method].append(timing)
        for method, samples in timings.items():
            for phase, index, count in (("prefill", 0, tokens), ("decode", 1, batch_size)):
                seconds = [t[index] for t in samples]
                step = statistics.median(seconds)
                rows[f"{method}/{phase}"] = {"method": method, "phase": phase, "shape": shape, "seq": seq,
                                             "batch": batch_size, "step_ms": round(step * 1e3, 2),
                                             "tokens_per_s": round(count / step, 1),
                                             "samples_ms": [round(t * 1e3, 2) for t in seconds]}
    for key, row in rows.items():
        phase = row["phase"]
        for name, other in (("peft_lora", rows.get("peft_lora" if phase == "train" else f"peft_lora/{phase}")),
                            ("base", rows.get("base" if phase == "train" else f"base/{phase}"))):
            row[f"ratio_vs_{name}"] = paired_ratio(row, other)
    failed = [{"method": m, "shape": shape, "seq": seq, "batch": batch_size, "error": e} for m, e in errors.items()]
    del models, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values()) + failed


def paired_ratio(row: dict, other: dict | None) -> float | None:
    """``row``'s time over ``other``'s: the median of the per-round ratios when both have samples from
    the same rounds (a slow round slows both, so the pairing cancels the machine's drift), else the
    ratio of the medians."""
    if other is None:
        return None
    mine, theirs = row.get("samples_ms"), other.get("samples_ms")
    if mine and theirs and len(mine) == len(theirs):
        return round(statistics.median(a / b for a, b in zip(mine, theirs)), 3)
    return round(row["step_ms"] / other["step_ms"], 3)


def _commit() -> str | None:
    """The checkout's commit, so a JSON says which code it timed."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--runs", help="shape:seq:batch,... (default: per device, e.g. smollm2-135m:256:4)")
    parser.add_argument("--stage", default="joint", help="stage of our methods (joint: the most expensive)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--against", metavar="REV", help="also time our methods with the layers as committed at "
                        "git revision REV (rows 'method@REV'), in the same process")
    parser.add_argument("--adamw", choices=["fused", "default"], default="fused",
                        help="AdamW for every configuration: fused (what modula-ray's engine uses) or torch's default")
    parser.add_argument("--compile", action="store_true", help="torch.compile every configuration (peft too)")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: re-run with glibc keeping freed memory (stable CPU timings); default: as is")
    parser.add_argument("--serving", action="store_true",
                        help="with --inference: also time each LoRA method's serving form, unfolded and folded")
    parser.add_argument("--decode-steps", type=int, default=16, help="greedy steps timed after each prefill")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="time the training step (--no-train: inference only)")
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=None,
                        help="also time prefill and one decode step (default: on CUDA only)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.malloc == "keep":
        keep_freed_memory()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.inference = args.device == "cuda" if args.inference is None else args.inference
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    runs = DEFAULT_RUNS[args.device]
    if args.runs:
        try:
            runs = [(s, int(q), int(b)) for s, q, b in (item.split(":") for item in args.runs.split(","))]
        except ValueError:
            parser.error(f"--runs: expected shape:seq:batch[,...], got {args.runs!r}")
        bad = [s for s, _, _ in runs if s not in SHAPES]
        if bad:
            parser.error(f"--runs: unknown shape {bad}; choose from {list(SHAPES)}")
    peak, peak_basis = peak_flops(args.device)
    started = time.perf_counter()
    rows = [row for shape, seq, batch in runs for row in bench_shape(shape, seq, batch, methods, args, peak)]
    if args.device == "cpu":  # a shared CPU's speed drifts: the peak is the faster of two measurements
        later = peak_flops(args.device)[0]
        for row in rows:
            if row.get("mfu") is not None:
                row["mfu"] = round(row["mfu"] * peak / max(peak, later), 4)
        peak = max(peak, later)
    machine = {"device": args.device, "name": torch.cuda.get_device_name() if args.device == "cuda"
               else platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "malloc": args.malloc, "adamw": args.adamw, "torch": torch.__version__, "peak_flops": peak,
               "peak_basis": peak_basis}
    try:
        import peft
        import transformers
        machine |= {"transformers": transformers.__version__, "peft": peft.__version__}
    except ImportError:
        pass
    result = {"benchmark": "bench_layers", "commit": _commit(), "command": " ".join(["python", "benchmarks/bench_layers.py"] +
                                                             sys.argv[1:]),
              "machine": machine, "repeats": args.repeats, "warmup": args.warmup,
              "wall_s": round(time.perf_counter() - started, 1), "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
