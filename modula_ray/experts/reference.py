"""Plain reference implementation: one Python loop per expert, straight from the equations.

It reads only the named parameters of the layer contract (``universal.A``, ``domain.B``,
``router.weight`` ...) and exists so tests can hold the stacked fast path to it, for
outputs and gradients. Never used in training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .modula_res import NEGATIVE_SLOPE


def reference_gates(x: torch.Tensor, weight: torch.Tensor, bias, top_k, temperature: float) -> torch.Tensor:
    """``softmax(W_R x / tau)``; with top_k, zero all but the k largest and renormalise."""
    logits = x @ weight.T
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_k is None or top_k >= weight.shape[0]:
        return probs
    keep = torch.zeros_like(probs)
    keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, 1.0)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``y`` for ``layer`` in its current stage, computed expert by expert (dropout not applied)."""
    p = dict(layer.named_parameters())
    kw = layer.layer_kwargs
    s_u = kw["universal_alpha"] / kw["universal_rank"]
    s_d = kw["domain_alpha"] / kw["domain_rank"]
    y = x @ p["base.weight"].T
    if "base.bias" in p:
        y = y + p["base.bias"]
    method, stage, n = layer.method, layer.stage, layer.n_domains

    def universal(v):
        return s_u * ((v @ p["universal.A"].T) @ p["universal.B"].T)

    def domain(i, v):
        return s_d * ((v @ p["domain.A"][i].T) @ p["domain.B"][i].T)

    def domain_res(i, h):
        return s_d * (F.leaky_relu(h @ p["domain.A"][i].T, NEGATIVE_SLOPE) @ p["domain.B"][i].T)

    mixing = stage in ("router", "joint") and "router.weight" in p
    gates = (reference_gates(x, p["router.weight"], p.get("router.bias"), kw["top_k"], kw["temperature"])
             if mixing else None)

    if method == "lora" or stage == "universal":
        return y + universal(x)
    if method == "molora":
        for i in range(n):
            y = y + (gates[..., i:i + 1] if mixing else 1.0) * domain(i, x)
        return y
    if method == "modula_flan":
        if not mixing:
            return y + domain(0, x)
        y = y + gates[..., 0:1] * universal(x)
        for i in range(n):
            y = y + gates[..., i + 1:i + 2] * domain(i, x)
        return y
    if method == "modula_res":
        h = universal(x)
        y = y + h
        for i in range(n):
            y = y + (gates[..., i:i + 1] if mixing else 1.0) * domain_res(i, h)
        return y
    raise ValueError(f"no reference for method {method!r}")
