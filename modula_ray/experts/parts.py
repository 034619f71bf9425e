"""Low-rank building blocks. They hold parameters only; the methods decide the maths.

``LowRankExpert``     one LoRA pair: ``A [r, d_read]`` (random), ``B [d_out, r]`` (zeros).
``StackedExperts``    n pairs stored stacked: ``A [n, r, d_read]``, ``B [n, d_out, r]``.

With B at zero every expert starts as an exact no-op, so a freshly injected model
returns the base model's logits.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    # peft's default for lora_A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(tensor.shape[-1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class LowRankExpert(nn.Module):
    """``delta(x) = B A x``; the caller applies the scale ``alpha / r``."""

    def __init__(self, d_read: int, d_out: int, rank: int, *, dtype=None, device=None):
        super().__init__()
        self.A = nn.Parameter(_kaiming_(torch.empty(rank, d_read, dtype=dtype, device=device)))
        self.B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T


class StackedExperts(nn.Module):
    """n low-rank experts held as two stacked tensors, used as one LoRA of rank ``n r``.

    ``flat_A`` ``[n r, d_read]`` (a view) and ``flat_B`` ``[d_out, n r]`` put expert i's ranks at
    ``i r : (i+1) r``, so ``sum_i g_i B_i A_i x = flat_B (g (x) A x)`` with the gates applied in
    rank space: two matmuls whatever n, and never a ``[tokens, n, d_out]`` tensor.
    """

    def __init__(self, n: int, d_read: int, d_out: int, rank: int, *, dtype=None, device=None):
        super().__init__()
        self.A = nn.Parameter(_kaiming_(torch.empty(n, rank, d_read, dtype=dtype, device=device)))
        self.B = nn.Parameter(torch.zeros(n, d_out, rank, dtype=dtype, device=device))

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def flat_A(self) -> torch.Tensor:
        return self.A.flatten(0, 1)

    @property
    def flat_B(self) -> torch.Tensor:
        return self.B.permute(1, 0, 2).flatten(1)
