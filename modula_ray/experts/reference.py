"""Plain reference pieces: per-expert loops straight from the equations.

Each method's ``reference(x)`` (in its file under ``methods/``) is built from these. They read
only the named parameters of the layer contract (``universal.A``, ``domain.B``,
``router.weight`` ...) and exist so tests can hold the stacked fast path to them, for outputs
and gradients. Never used in training; dropout is not applied.
"""
from __future__ import annotations

import torch


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


class Terms:
    """The named parameters of one layer as plain functions: ``base(x)``, ``universal(x)``,
    ``domain(i, v)`` (``s_d B_i A_i v``, the rank activation passed through ``act``), ``gates(x)``
    (from ``x``, or with a block-placed router from the block's normed input)."""

    def __init__(self, layer):
        self.p = dict(layer.named_parameters())
        s = self.settings = layer.settings
        self.n, self.stage = layer.n_domains, layer.stage
        self.s_u = s.universal_alpha / s.universal_rank
        self.s_d = s.domain_alpha / s.domain_rank
        self.mixing = layer.mixing
        shared = layer.shared_router  # placement 'block': the gates read the block's normed input
        self.router = dict(shared.named_parameters()) if shared is not None else {
            k.removeprefix("router."): v for k, v in self.p.items() if k.startswith("router.")}
        self.router_input = shared.last_input if shared is not None else None

    def base(self, x):
        y = x @ self.p["base.weight"].T
        return y + self.p["base.bias"] if "base.bias" in self.p else y

    def universal(self, x):
        return self.s_u * ((x @ self.p["universal.A"].T) @ self.p["universal.B"].T)

    def domain(self, i: int, v, act=lambda z: z):
        return self.s_d * (act(v @ self.p["domain.A"][i].T) @ self.p["domain.B"][i].T)

    def gates(self, x):
        source = x if self.router_input is None else self.router_input
        return reference_gates(source, self.router["weight"], self.router.get("bias"), self.settings.top_k,
                               self.settings.temperature)


def reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``y`` for ``layer`` in its current stage, computed by its method's per-expert loop."""
    return layer.reference(x)
