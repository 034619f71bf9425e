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
    """n low-rank experts held as two stacked tensors and computed with two matmuls.

    ``down(x)`` gives every expert's rank activations at once, ``[T, n, r]``;
    ``up(z)`` contracts experts and rank together, ``sum_i B_i z_i`` -> ``[T, d_out]``,
    so the gates can be folded into ``z`` before the single up-projection.
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

    def down(self, x: torch.Tensor) -> torch.Tensor:
        n, r, d_read = self.A.shape
        return (x @ self.A.reshape(n * r, d_read).T).view(*x.shape[:-1], n, r)

    def up(self, z: torch.Tensor) -> torch.Tensor:
        n, d_out, r = self.B.shape
        b_flat = self.B.permute(1, 0, 2).reshape(d_out, n * r)
        return z.reshape(*z.shape[:-2], n * r) @ b_flat.T
