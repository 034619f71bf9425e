"""Token-level router: ``g = softmax(W_R x / tau)``, optionally top-k and renormalised.

After every forward the router keeps two things for the training loop and reports:

``aux_loss``    Switch-Transformer load balance, ``n * sum_i f_i * P_i``, where ``f_i`` is
                the share of token slots dispatched to expert i (top-1, or top-k when set)
                and ``P_i`` the mean router probability of expert i. It equals 1 for a
                perfectly balanced router and grows to n when one expert takes all.
``mean_gates``  the gates averaged over tokens (detached), ``[n_routed]``.
``last_gates``  the gates of the last position of every row (detached), ``[batch, n_routed]``:
                what the next generated token of each sequence was routed with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    def __init__(self, d_in: int, n_routed: int, *, top_k: int | None = None, temperature: float = 1.0,
                 bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_routed, d_in, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(n_routed, dtype=dtype, device=device)) if bias else None
        self.top_k = top_k
        self.temperature = temperature
        self.aux_loss: torch.Tensor | None = None
        self.mean_gates: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None

    @property
    def n_routed(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_in]`` -> gates ``[..., n_routed]`` summing to 1 over the last axis."""
        logits = F.linear(x, self.weight, self.bias) / self.temperature
        probs = logits.softmax(dim=-1)
        k = self.top_k or self.n_routed
        if k < self.n_routed:
            chosen = logits.topk(k, dim=-1).indices
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, chosen, True)
            gates = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        else:
            chosen = logits.argmax(dim=-1, keepdim=True)
            gates = probs
        self._record(probs, gates, chosen)
        return gates

    def _record(self, probs: torch.Tensor, gates: torch.Tensor, chosen: torch.Tensor) -> None:
        k = chosen.shape[-1]
        flat_probs = probs.reshape(-1, self.n_routed)
        dispatch = torch.zeros_like(flat_probs).scatter_(-1, chosen.reshape(-1, k), 1.0)
        share = dispatch.mean(dim=0) / k
        self.aux_loss = self.n_routed * (share * flat_probs.mean(dim=0)).sum()
        self.mean_gates = gates.detach().reshape(-1, self.n_routed).float().mean(dim=0)
        self.last_gates = gates.detach()[:, -1].float() if gates.dim() == 3 else None

    def extra_repr(self) -> str:
        return f"n_routed={self.n_routed}, top_k={self.top_k}, temperature={self.temperature}"
