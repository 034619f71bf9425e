"""What optimizer step s uses, as pure functions of s: its batches and its learning rate.

Batches: the examples (sorted by row id, so Ray's arrival order does not matter) form an endless
stream of epochs, epoch e shuffled with ``seed + e``. Optimizer step s consumes global
positions ``[s * G, (s + 1) * G)`` with ``G = world * batch_size * grad_accum``; inside a
step, micro-batch m of rank r takes the ``batch_size`` positions starting at
``s * G + (m * world + r) * batch_size``. Resuming at step s needs nothing but s.

Learning rate: ``lr * lr_lambda(W, T)(s)`` with W warmup steps of T: ``(s + 1) / W`` while
``s < W``, then ``0.1 + 0.9 * (1 + cos(pi * p)) / 2`` with ``p = min(1, (s - W) / max(1, T - W))``,
a cosine decay to 10% of ``lr``. transformers' ``get_cosine_with_min_lr_schedule_with_warmup``
(``min_lr_rate=0.1``) equals it only without warmup: its warmup is ``s / W``, so its first step
has lr 0 (its ``_lr_rate`` variant decays one step early); the pinned values are in
tests/unit/test_schedule.py.
"""
from __future__ import annotations

import math

import numpy as np


def lr_lambda(warmup: int, total: int):
    """The factor on ``lr`` at step ``s`` (0-based): ``torch.optim.lr_scheduler.LambdaLR``'s ``lr_lambda``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class BatchSchedule:
    def __init__(self, n_examples: int, *, world: int, rank: int, batch_size: int, grad_accum: int, seed: int):
        if n_examples < 1:
            raise ValueError("BatchSchedule needs at least one example")
        self.n, self.world, self.rank = n_examples, world, rank
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self._epochs: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.world * self.batch_size * self.grad_accum

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._epochs:
            self._epochs = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
        return int(self._epochs[epoch][offset])

    def indices(self, step: int, micro: int) -> list[int]:
        """Example indices of micro-batch ``micro`` of optimizer step ``step`` (0-based) on this rank."""
        start = step * self.global_batch + (micro * self.world + self.rank) * self.batch_size
        return [self._at(p) for p in range(start, start + self.batch_size)]
