"""Token-level router: ``g = softmax(W_R x / tau)``, optionally top-k and renormalised.

After every forward the router keeps three things for the training loop and reports, each
computed when first read (serving reads only ``last_gates``, so it pays for nothing else):

``aux_loss``    Switch-Transformer load balance, ``n * sum_i f_i * P_i``, where ``f_i`` is
                the share of token slots dispatched to expert i (top-1, or top-k when set)
                and ``P_i`` the mean router probability of expert i. It equals 1 for a
                perfectly balanced router and grows to n when one expert takes all.
``mean_gates``  the gates averaged over tokens (detached), ``[n_routed]``.
``entropy``     the mean over tokens of the routing distribution's entropy over ``log n``
                (detached): 1 for a uniform router, 0 for a one-hot one.
``last_gates``  the gates of the last position of every row (detached), ``[batch, n_routed]``:
                what the next generated token of each sequence was routed with.

``routing_loss(labels)`` is the optional supervised term (``route_loss_coef``): the mean over
labelled tokens of ``-log P_label``, the router's probability of the token's own expert
(``labels [batch, seq]`` holds routed-expert indices, -100 where a token has no label).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class Router(nn.Module):
    def __init__(self, d_in: int, n_routed: int, *, top_k: int | None = None, temperature: float = 1.0,
                 bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_routed, d_in, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(n_routed, dtype=dtype, device=device)) if bias else None
        self.top_k = top_k
        self.temperature = temperature
        self._last: tuple | None = None  # (probs, gates, chosen, logits) of the last forward
        self._stats: dict = {}
        self._watchers: OrderedDict[int, object] = OrderedDict()  # RemovableHandle needs a weakref-able dict

    @property
    def n_routed(self) -> int:
        return self.weight.shape[0]

    @property
    def dense(self) -> bool:
        """Every routed expert gets a gate (no top-k below ``n_routed``)."""
        return not self.top_k or self.top_k >= self.n_routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_in]`` -> gates ``[..., n_routed]`` summing to 1 over the last axis."""
        return self.gate(x @ self.weight.T)

    def gate(self, scores: torch.Tensor) -> torch.Tensor:
        """Gates from ``W_R x`` computed elsewhere (an expert layer reads it in the same matmul as its
        A matrices): adds the bias, divides by tau, applies softmax and top-k, records the statistics."""
        logits = scores if self.bias is None else scores + self.bias
        logits = logits if self.temperature == 1 else logits / self.temperature
        probs = logits.softmax(dim=-1)
        chosen = None  # dense: top-1 for the load balance, found when it is read
        if not self.dense:
            chosen = logits.topk(self.top_k, dim=-1).indices
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, chosen, True)
            gates = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        else:
            gates = probs
        self._record(probs, gates, chosen, logits)
        return gates

    def _record(self, probs: torch.Tensor, gates: torch.Tensor, chosen: torch.Tensor, logits: torch.Tensor) -> None:
        self._last, self._stats = (probs, gates, chosen, logits), {}
        if self._watchers:
            for watcher in self._watchers.values():
                watcher(gates.detach())

    def watch(self, fn) -> RemovableHandle:
        """Call ``fn(gates)`` with the (detached) gates of every routing, however they were computed:
        a forward hook would miss the layers that call ``gate`` on scores read with their A matrices."""
        handle = RemovableHandle(self._watchers)
        self._watchers[handle.id] = fn
        return handle

    def _stat(self, name: str, compute):
        if self._last is None:
            return None
        if name not in self._stats:
            self._stats[name] = compute(*self._last[:3])
        return self._stats[name]

    @property
    def aux_loss(self) -> torch.Tensor | None:
        def switch(probs, gates, chosen):
            chosen = probs.detach().argmax(dim=-1, keepdim=True) if chosen is None else chosen
            k = chosen.shape[-1]
            flat_probs = probs.reshape(-1, self.n_routed)
            dispatch = torch.zeros_like(flat_probs).scatter_(-1, chosen.reshape(-1, k), 1.0)
            return self.n_routed * (dispatch.mean(dim=0) / k * flat_probs.mean(dim=0)).sum()
        return self._stat("aux_loss", switch)

    @property
    def mean_gates(self) -> torch.Tensor | None:
        return self._stat("mean_gates", lambda p, gates, c: gates.detach().reshape(-1, self.n_routed).float().mean(0))

    @property
    def entropy(self) -> torch.Tensor | None:
        def normalised(probs, gates, chosen):
            p = probs.detach().float().reshape(-1, self.n_routed)
            return -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / torch.log(torch.tensor(float(self.n_routed)))
        return self._stat("entropy", normalised)

    @property
    def last_gates(self) -> torch.Tensor | None:
        return self._stat("last_gates", lambda p, gates, c: gates.detach()[:, -1].float() if gates.dim() == 3 else None)

    def routing_loss(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Mean ``-log P_label`` over the labelled tokens of the last forward (0 if none is labelled)."""
        if self._last is None:
            return None
        logits = self._last[3]
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"routing labels {tuple(labels.shape)} do not match the routed tokens "
                             f"{tuple(logits.shape[:-1])}")
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, self.n_routed).float(), labels.reshape(-1),
                                                  ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"n_routed={self.n_routed}, top_k={self.top_k}, temperature={self.temperature}"
