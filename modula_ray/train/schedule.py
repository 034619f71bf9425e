"""Deterministic batches: the data position is a pure function of the step.

The examples (sorted by row id, so Ray's arrival order does not matter) form an endless
stream of epochs, epoch e shuffled with ``seed + e``. Optimizer step s consumes global
positions ``[s * G, (s + 1) * G)`` with ``G = world * batch_size * grad_accum``; inside a
step, micro-batch m of rank r takes the ``batch_size`` positions starting at
``s * G + (m * world + r) * batch_size``. Resuming at step s needs nothing but s.
"""
from __future__ import annotations

import numpy as np


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
