"""The serving form of a composed model: its expert layers rebuilt for inference, once, at load.

``serving_form(model, fold=False)`` replaces each LoRA-shaped expert layer of a finished model
(at its ``inference_stage``) by a ``ServingLinear`` whose weight products are computed once (each
method's ``serving(fold)``, in its own file, builds it), so a
decode step runs three matmuls and a few elementwise ops per projection and no Python around
them. The run folder is never touched; the trained tensors are dropped from the model.

Per projection, with ``g`` the layer's own ``Router`` (routing reports still read it)::

    [u, z, s] = x [P_u; P_z; W_R]^T         one matmul: ungated ranks, gated ranks, router scores
    c = [u, act(z) * router(s)[columns]]    each gated rank times its expert's gate (res: z [N, n, r]
                                            times the gates); the experts' scales are folded into U
    y = W x + b + c U^T                     W is W0, or W0 + s* B* A* folded (``fold``); a folded W is
                                            the layer's own, so [W; P_u; P_z; W_R] is one matmul

========== ============================== ========= ================ =================================
method     P_u ; P_z                      act       U                ``fold``
========== ============================== ========= ================ =================================
lora       s A ;  -                       -         B                W0 + s B A: a plain linear
molora     - ; flat_A                     identity  flat_B           nothing to fold
flan       - ; [A*; flat_A]               identity  [B*, flat_B]     not folded: the universal expert
                                                                     is gated by g_0(x), so W0 + s*B*A*
                                                                     would still need a (g_0 - 1) path
res        s* A* ; K = s* flat_A B* A*    LeakyReLU [B*, flat_B]     W0 + s* B* A*; P_u and B* go, and K
                                                                     still gives every A_i h
========== ============================== ========= ================ =================================

``K`` is exact algebra (``A_i h = A_i B* (s* A* x)``), so the serving form equals the trained
layer up to float rounding (tests hold it to ``reference``). Folding writes a new ``W`` per
composition: it costs a copy of the adapted weights, so a replica that shares one base between
compositions leaves it off (``ServeArgs.fold_universal``). Layers routed per block, and ``mode``,
keep their trained form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import ExpertLinear


class ServingLinear(nn.Module):
    """``y = W x + b + c U^T`` with ``c`` from one read of ``x`` (see the module docstring)."""

    def __init__(self, weight, bias, read=None, widths=(0, 0), router=None, columns=None, up=None, slope=None,
                 folded: bool = False, ranks: tuple[int, int] | None = None):
        super().__init__()
        self.ranks = ranks                               # (n, r): every gated expert has r ranks (res),
                                                         # so gates multiply z [N, n, r] as it is (scale in U)
        self.folded = folded                             # W is a new W0 + s* B* A*, not the base's
        self.weight, self.bias = weight, bias            # tensors, not parameters: nothing here trains
        self.read, self.widths, self.router, self.up = read, [*widths, 0 if router is None else router.n_routed], \
            router, up
        self.columns, self.slope = columns, slope        # columns[j]: the routed expert of gated rank j
        self.fused = self.fused_bias = None
        if folded and read is not None:                  # W is this layer's own: [W; read^T] is one matmul,
            out = weight.shape[0]                        # with W and read views of it (no copy kept)
            self.fused = torch.cat([weight, read.T]).contiguous()
            self.weight, self.read = self.fused[:out], self.fused[out:].T
            self.fused_bias = None if bias is None else torch.cat([bias, bias.new_zeros(read.shape[1])])

    def code(self, read: torch.Tensor, lead: tuple) -> torch.Tensor:
        """``c [N, R]`` from this layer's columns of ``x @ read`` (``lead``: x's leading shape, for the
        router's records); the experts' scales are in ``up``. Works in place on ``read`` (a fresh
        product, used once) and returns a view of it: at decode every op counts."""
        wu, wz, n = self.widths
        if self.router is None:
            return read
        gates = self.router.gate(read[:, wu + wz:].view(*lead, n)).view(-1, n)
        z = read[:, wu:wu + wz]
        if self.slope is not None:
            F.leaky_relu_(z, self.slope)
        if self.ranks is not None:
            z.view(-1, *self.ranks).mul_(gates.unsqueeze(-1))
        else:
            z.mul_(gates.index_select(-1, self.columns))
        return read[:, :wu + wz]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.fused is not None:  # folded: W x and the read from one matmul; y is a (strided) view
            both = F.linear(flat, self.fused, self.fused_bias)
            y, read = both.split([self.weight.shape[0], self.read.shape[1]], dim=-1)
            return y.addmm_(self.code(read, x.shape[:-1]), self.up).view(*x.shape[:-1], y.shape[-1])
        y = F.linear(flat, self.weight, self.bias)
        if self.read is not None:
            y = y.addmm_(self.code(flat @ self.read, x.shape[:-1]), self.up)
        return y.view(*x.shape[:-1], y.shape[-1])


def side_by_side(*rows: torch.Tensor) -> torch.Tensor:
    """``[d_in, sum of rows]``: the matrices that read x, side by side, for ``x @ read``."""
    return torch.cat(rows).T.contiguous()


def gated_columns(layer: ExpertLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """For each gated rank column: the routed expert it belongs to and that expert's scale (from the
    layer's ``gate_expansion``), so the gates reach the ranks by one index and the scales go into U."""
    expand = layer.gate_expansion
    return expand.argmax(dim=0), expand.sum(dim=0)


def serving_form(model: nn.Module, fold: bool = False) -> nn.Module:
    """``model`` (a finished composition, in eval mode) with its expert layers in serving form, in
    place; ``model.modula_serving_routers`` lists every router that still mixes, for routing reports."""
    from .inject import expert_layers, routers

    model.modula_serving_routers = list(routers(model).values())
    for path, layer in expert_layers(model).items():
        if not isinstance(layer, ExpertLinear):
            continue
        with torch.no_grad():
            served = layer.serving(fold)
        if served is None:
            continue
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, served)
    return model.requires_grad_(False)
