"""What each speed technique of ``ExpertLinear`` buys, measured one at a time at layer level.

    python benchmarks/layer_techniques.py [--tokens 1024] [--repeats 25] [--compile] --out FILE.json

One transformer block's seven projections at SmolLM2-135M's shapes, forward + backward (gradients
for x and for every trainable part, the joint stage), fp32, median of ``--repeats`` rounds. Each
variant below adds one technique to the one before up to ``shipped`` (``ExpertLinear.forward``);
``frozen_and_read`` is one more that was measured and not kept. Every variant is checked against
the method's per-expert loop (``reference``) before it is timed. peft LoRA r16 and the frozen layer alone are timed in the same
process, interleaved round by round. Results and predictions: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modula_ray.experts import wrap_linear  # noqa: E402
from modula_ray.experts.methods.modula_res import NEGATIVE_SLOPE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import _commit, keep_freed_memory  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def gate_ranks(l, z, gates):
    return (z.unflatten(-1, (gates.shape[-1], -1)) * (l.domain_scale * gates).unsqueeze(-1)).flatten(-2)


def read(l, x, *mats):
    mats = (*mats, l.router.weight)
    *pieces, scores = (x @ torch.cat(mats).T).split([m.shape[0] for m in mats], dim=-1)
    return pieces, l.router.gate(scores)


# -- modula_flan: y = W0 x + g_0 s* B* A* x + sum_i g_i s B_i A_i x ---------------------------------
def flan_separate(l, x):
    """Before: the router, A*, the stacked A_i and the stacked B_i each a matmul; g_0 s* on [T, d_out]."""
    gates = l.router(x)
    universal = ((x @ l.universal.A.T) @ l.universal.B.T) * (l.universal_scale * gates[..., :1])
    domains = gate_ranks(l, x @ l.domain.flat_A.T, gates[..., 1:]) @ l.domain.flat_B.T
    return l.base(x) + (universal + domains)


def flan_one_read(l, x):
    """+ one matmul reads x for A*, every A_i and the router (concatenated)."""
    (u, z), gates = read(l, x, l.universal.A, l.domain.flat_A)
    universal = (u @ l.universal.B.T) * (l.universal_scale * gates[..., :1])
    return l.base(x) + (universal + gate_ranks(l, z, gates[..., 1:]) @ l.domain.flat_B.T)


def flan_one_up(l, x):
    """+ g_0 s* applied to the rank columns, and one matmul up through [B*, B_1..B_n]."""
    code, up = flan_code(l, x)
    return l.base(x) + code @ up.T


# -- modula_res: h = s* B* A* x; y = W0 x + h + sum_i g_i s B_i LeakyReLU(A_i h) --------------------
def res_separate(l, x):
    """Before: h formed; the stacked A_i read h; s* on [T, d_out]; router and sums separate."""
    h = l.universal_scale * ((x @ l.universal.A.T) @ l.universal.B.T)
    z = F.leaky_relu(h @ l.domain.flat_A.T, NEGATIVE_SLOPE)
    return l.base(x) + (h + gate_ranks(l, z, l.router(x)) @ l.domain.flat_B.T)


def res_one_read(l, x):
    """+ one matmul reads x for A* and the router; s* applied to the rank columns."""
    (u,), gates = read(l, x, l.universal.A)
    h = (u * l.universal_scale) @ l.universal.B.T
    z = F.leaky_relu(h @ l.domain.flat_A.T, NEGATIVE_SLOPE)
    return l.base(x) + (h + gate_ranks(l, z, gates) @ l.domain.flat_B.T)


def res_no_h(l, x):
    """+ A_i h = (A_i B*)(s* A* x): a [n r, r*] product replaces h [T, d_out] as the A_i input."""
    (u,), gates = read(l, x, l.universal.A)
    u = u * l.universal_scale
    z = F.leaky_relu(u @ (l.domain.flat_A @ l.universal.B).T, NEGATIVE_SLOPE)
    return l.base(x) + (u @ l.universal.B.T + gate_ranks(l, z, gates) @ l.domain.flat_B.T)


def res_one_up(l, x):
    """+ one matmul up through [B*, B_1..B_n]."""
    code, up = res_code(l, x)
    return l.base(x) + code @ up.T


def res_code(l, x, gates_matmul=False):
    """(code, up) of res from one read, the domain gates broadcast or (``gates_matmul``) through E."""
    (u,), gates = read(l, x, l.universal.A)
    u = u * l.universal_scale
    z = F.leaky_relu(u @ (l.domain.flat_A @ l.universal.B).T, NEGATIVE_SLOPE)
    z = l.gate_ranks(z, gates) if gates_matmul else gate_ranks(l, z, gates)
    return torch.cat([u, z], dim=-1), torch.cat([l.universal.B, l.domain.flat_B], dim=1)


def flan_code(l, x, gates_matmul=False):
    """(code, up) of flan from one read, the gates broadcast or (``gates_matmul``) through E."""
    if gates_matmul:
        (ranks,), gates = read(l, x, torch.cat([l.universal.A, l.domain.flat_A]))
        code = l.gate_ranks(ranks, gates)
    else:
        (u, z), gates = read(l, x, l.universal.A, l.domain.flat_A)
        code = torch.cat([u * (l.universal_scale * gates[..., :1]), gate_ranks(l, z, gates[..., 1:])], dim=-1)
    return code, torch.cat([l.universal.B, l.domain.flat_B], dim=1)


def _up(code, up, y0, x, in_place):
    code = code.reshape(-1, code.shape[-1])
    y = y0.addmm_(code, up.T) if in_place else torch.addmm(y0, code, up.T)
    return y.view(*x.shape[:-1], -1)


def _frozen(l, x):
    return F.linear(x.reshape(-1, x.shape[-1]), l.base.weight)


def flan_addmm(l, x):
    """+ the sum with the frozen path inside the up matmul (``torch.addmm``)."""
    return _up(*flan_code(l, x), _frozen(l, x), x, in_place=False)


def res_addmm(l, x):
    """+ the sum with the frozen path inside the up matmul (``torch.addmm``)."""
    return _up(*res_code(l, x), _frozen(l, x), x, in_place=False)


def flan_in_place(l, x):
    """+ ``addmm_`` into W0 x in place (``torch.addmm`` first copies W0 x into its output)."""
    return _up(*flan_code(l, x), _frozen(l, x), x, in_place=True)


def res_in_place(l, x):
    """+ ``addmm_`` into W0 x in place (``torch.addmm`` first copies W0 x into its output)."""
    return _up(*res_code(l, x), _frozen(l, x), x, in_place=True)


def flan_gates_matmul(l, x):
    """+ gates and scales reach the rank columns as one multiply by ``gates @ E`` (no cat, no broadcast)."""
    return _up(*flan_code(l, x, gates_matmul=True), _frozen(l, x), x, in_place=True)


def res_gates_matmul(l, x):
    """+ gates and scales reach the rank columns as one multiply by ``gates @ E`` (no cat, no broadcast)."""
    return _up(*res_code(l, x, gates_matmul=True), _frozen(l, x), x, in_place=True)


def shipped(l, x):
    """= ``ExpertLinear.forward`` (the last technique kept)."""
    return l(x)


class FrozenAndRead(torch.autograd.Function):
    """``(W0 x + b0, x D^T)`` for a frozen ``W0`` and the concatenated read ``D`` (A matrices, router).

    Autograd would form ``dx`` as two products and a sum, ``dy W0 + dz D``; this backward forms it in
    one buffer (``addmm_``), saves nothing but x, and skips ``dx`` when x needs no gradient. Under
    autocast the backward runs in the forward's autocast state, as ``torch.amp.custom_bwd`` does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down):
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.save_for_backward(x, weight, down)
        return F.linear(x, weight, bias), x @ down.T

    @staticmethod
    def backward(ctx, dy, dz):
        x, weight, down = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            dx = (dy @ weight).addmm_(dz, down.to(dy.dtype)) if ctx.needs_input_grad[0] else None
            ddown = (dz.T @ x.to(dz.dtype)) if ctx.needs_input_grad[3] else None
        return dx, None, None, ddown

def frozen_and_read(l, x):
    """shipped + W0 x and the read as one autograd node that forms dx in one buffer (not kept).

    Measured against ``shipped`` in docs/PERFORMANCE.md: it did not pay."""
    mats = (l.universal.A, l.domain.flat_A, l.router.weight) if l.method == "modula_flan" else \
        (l.universal.A, l.router.weight)
    tokens = x.reshape(-1, x.shape[-1])
    y0, scores = FrozenAndRead.apply(tokens, l.base.weight, l.base.bias, torch.cat(mats))
    *ranks, logits = scores.split([sum(m.shape[0] for m in mats[:-1]), mats[-1].shape[0]], dim=-1)
    gates = l.router.gate(logits)
    if l.method == "modula_flan":
        code = l.gate_ranks(ranks[0], gates)
    else:
        u = ranks[0] * l.universal_scale
        z = F.leaky_relu(u @ (l.domain.flat_A @ l.universal.B).T, NEGATIVE_SLOPE)
        code = torch.cat([u, l.gate_ranks(z, gates)], dim=-1)
    return y0.addmm_(code, torch.cat([l.universal.B, l.domain.flat_B], dim=1).T).view(*x.shape[:-1], -1)


CHAINS = {"modula_flan": [flan_separate, flan_one_read, flan_one_up, flan_addmm, flan_in_place, flan_gates_matmul,
                          shipped, frozen_and_read],
          "modula_res": [res_separate, res_one_read, res_no_h, res_one_up, res_addmm, res_in_place, res_gates_matmul,
                         shipped, frozen_and_read]}


def timed(runs: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each callable in ``runs``, interleaved: every round calls each once, the
    order rotating, so a slow moment of the machine falls on all of them alike."""
    names, samples = list(runs), {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            runs[name]()
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


class Proj(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the shipped layer")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: re-run with glibc keeping freed memory, as bench_layers.py does")
    args = parser.parse_args(argv)
    if args.malloc == "keep":
        keep_freed_memory()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    totals: dict[str, float] = {}
    for d_in, d_out in SHAPES:
        x = torch.randn(4, args.tokens // 4, d_in, requires_grad=True)
        grad = torch.randn(4, args.tokens // 4, d_out)
        base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        peft_model = get_peft_model(Proj(base), LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]))
        runs = {"base": base, "peft_lora": peft_model}
        for method, chain in CHAINS.items():
            layer = wrap_linear(base, method, 4)
            with torch.no_grad():
                for p in layer.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.02)
            expected = layer.reference(x)
            for variant in chain:
                torch.testing.assert_close(variant(layer, x), expected, rtol=1e-4, atol=1e-5)
                runs[f"{method}/{variant.__name__}"] = (lambda v, l: lambda t: v(l, t))(variant, layer)
            if args.compile:
                compiled = torch.compile(layer)
                torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
                runs[f"{method}/shipped_compiled"] = compiled
        steps = {name: (lambda fn: lambda: fn(x).backward(grad))(fn) for name, fn in runs.items()}
        for name, seconds in timed(steps, args.repeats).items():
            totals[name] = totals.get(name, 0.0) + seconds
    rows = [{"variant": name, "ms": round(t * 1e3, 2), "ratio_vs_peft_lora": round(t / totals["peft_lora"], 3),
             "ratio_vs_base": round(t / totals["base"], 3)} for name, t in totals.items()]
    for method, chain in CHAINS.items():
        for variant in chain:
            doc = (variant.__doc__ or "").strip().splitlines()[0]
            next(r for r in rows if r["variant"] == f"{method}/{variant.__name__}")["technique"] = doc
    result = {"benchmark": "layer_techniques", "commit": _commit(), "command": " ".join(["python", "benchmarks/layer_techniques.py"]
                                                                   + sys.argv[1:]),
              "tokens": args.tokens, "malloc": args.malloc, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
