"""A bank's decode step in one pass over every member's adapters, whatever the mix of rows.

At decode a step holds one token per row, and its rows belong to several compositions (and to the
base model alone) in slot order. Running each member's adapter on its own rows costs a gather, a
scatter and about a dozen small ops per member per projection, and on a CPU each small op costs
several microseconds of dispatch whatever its size. A ``Union`` lays the members' matrices of one
projection side by side once, so a step runs the same few ops however many members it mixes::

    s = x [P_1 .. P_k | W_R,1/tau_1 .. W_R,k/tau_k | 0]^T   one matmul over every row
    g = softmax(s_R + b/tau + mask)     mask: 0 on the row's own member's router columns, -inf on the
                                        others; a row with no router here (the base model alone, or a
                                        member that does not route this projection) gets the zero
                                        "sink" column alone, so its gates are 0 on every expert
    c = act(s_P) * [g | m][:, source]   each rank column times its expert's gate, or (ungated ranks)
                                        m, the row's membership of the column's member (1 or 0)
    y = W0 x + b + c [U_1 .. U_k]^T     the experts' scales are in U, as in ``ServingLinear``

A row's columns of other members are exactly 0, so each row gets its own composition's
``ServingLinear.code`` (up to float rounding: the sums run over more zeros, and tau divides W_R
before the matmul). It spends the FLOPs of every member's ranks on every row: at decode, a few
hundred ranks against the base's ``d_in`` per projection, read from memory once either way.

Rank columns are ordered ungated, then gated by activation (each LeakyReLU slope one in-place op,
identity last). Routers with top-k cannot mix this way: such a member's layer gives no ``Union``
(``None``), and the bank runs each member on its own rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Union:
    """The side-by-side matrices of one projection's members (``layers[k]``: member k's
    ``ServingLinear``, or None where it does not adapt this projection)."""

    def __init__(self, layers: list):
        blocks, routers, self.ranges = [], [], []  # blocks: (order key, read columns, up rows, gate source)
        width = 0                                  # router columns so far
        for k, layer in enumerate(layers):
            if layer is None:
                self.ranges.append(None)
                continue
            wu, wz, n = layer.widths
            router = layer.router
            if wu:
                ungated = ("member", k, torch.zeros(wu, dtype=torch.long))
                blocks.append(((0, 0.0), layer.read[:, :wu], layer.up[:wu], ungated))
            if wz:
                expert = (torch.arange(wz) // layer.ranks[1] if layer.ranks is not None else layer.columns)
                key = (2, 0.0) if layer.slope is None else (1, float(layer.slope))
                blocks.append((key, layer.read[:, wu:wu + wz], layer.up[wu:wu + wz], ("router", k, expert)))
            if router is not None:
                tau = float(router.temperature)
                bias = (router.bias.detach().to(layer.read.dtype) / tau if router.bias is not None
                        else torch.zeros(n, dtype=layer.read.dtype))
                routers.append((layer.read[:, wu + wz:] / tau, bias))
                self.ranges.append((width, width + n))
                width += n
            else:
                self.ranges.append(None)
        self.layers, self.sink = layers, width
        blocks.sort(key=lambda block: block[0])    # stable: members keep their order within a kind
        self.ranks = sum(block[1].shape[1] for block in blocks)
        dtype = layers[next(k for k, layer in enumerate(layers) if layer is not None)].read.dtype
        reads = [block[1] for block in blocks] + [read for read, _ in routers]
        self.read = torch.cat(reads + [reads[0].new_zeros(reads[0].shape[0], 1)], dim=1).contiguous()
        self.up = torch.cat([block[2] for block in blocks]).contiguous()
        self.bias = torch.cat([bias for _, bias in routers] + [torch.zeros(1, dtype=dtype)]) \
            if any(layer is not None and layer.router is not None and layer.router.bias is not None
                   for layer in layers) else None
        sources, self.slopes, start = [], [], 0
        for key, read, _, (kind, k, index) in blocks:
            base = width + 1 + k if kind == "member" else self.ranges[k][0]
            sources.append(index + base)
            if key[0] == 1:
                if self.slopes and self.slopes[-1][2] == key[1] and self.slopes[-1][1] == start:
                    self.slopes[-1] = (self.slopes[-1][0], start + read.shape[1], key[1])
                else:
                    self.slopes.append((start, start + read.shape[1], key[1]))
            start += read.shape[1]
        self.source = torch.cat(sources)
        self.signature = (tuple(self.ranges), tuple(layer is not None for layer in layers))  # what masks read

    def masks(self, member_of_row: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For a step whose row ``i`` belongs to member ``member_of_row[i]`` (-1: the base alone):
        the additive softmax mask ``[rows, router columns + 1]`` and memberships ``[rows, members]``."""
        rows, members = len(member_of_row), len(self.layers)
        mask = torch.full((rows, self.sink + 1), float("-inf"), dtype=self.read.dtype)
        member = torch.zeros(rows, members, dtype=self.read.dtype)
        for i, k in enumerate(member_of_row):
            span = self.ranges[k] if k >= 0 else None
            if span is None:
                mask[i, self.sink] = 0.0
            else:
                mask[i, span[0]:span[1]] = 0.0
            if k >= 0 and self.layers[k] is not None:
                member[i, k] = 1.0
        return mask, member

    def add_to(self, y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, member: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``y += c U^T`` for rows ``x [rows, d_in]`` (one token each); returns ``(logits, gates)``."""
        s = x @ self.read
        logits = s[:, self.ranks:] + mask
        if self.bias is not None:
            logits += self.bias
        gates = logits.softmax(dim=-1)
        code = s[:, :self.ranks]
        for start, end, slope in self.slopes:
            F.leaky_relu_(code[:, start:end], slope)
        code.mul_(torch.cat([gates, member], dim=1).index_select(1, self.source))
        y.addmm_(code, self.up)
        return logits, gates

    def record(self, logits: torch.Tensor, gates: torch.Tensor, rows_of: list) -> None:
        """Each member's router keeps the gates of its own rows (``rows_of[k]``, in its local order),
        as its own forward would have: ``[rows, 1, n_routed]``."""
        for layer, span, rows in zip(self.layers, self.ranges, rows_of):
            if layer is None or span is None or rows is None:
                continue
            mine, scores = (t.index_select(0, rows)[:, span[0]:span[1]].unsqueeze(1) for t in (gates, logits))
            layer.router._record(mine, mine, None, scores)


def unites(layer) -> bool:
    """Whether ``layer`` (a member's ``ServingLinear``, or None) can decode in a ``Union``: dense routers only."""
    router = None if layer is None else layer.router
    return router is None or router.dense
