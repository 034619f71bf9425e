"""The serving form of a composed model: its expert layers rebuilt for inference, once, at load.

``serving_form(model, fold=False)`` replaces each LoRA-shaped expert layer of a finished model
(at its ``inference_stage``) by a ``ServingLinear`` whose weight products are computed once, so a
decode step runs three matmuls and a few elementwise ops per projection and no Python around
them. The run folder is never touched; the trained tensors are dropped from the model.

Per projection, with ``g`` the layer's own ``Router`` (routing reports still read it)::

    [u, z, s] = x [P_u; P_z; W_R]^T         one matmul: ungated ranks, gated ranks, router scores
    c = [u, act(z) * router(s)[columns]]    each gated rank times its expert's gate (res: z [N, n, r]
                                            times the gates); the experts' scales are folded into U
    y = W x + b + c U^T                     W is W0, or W0 + s* B* A* folded (``fold``)

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
from .methods.modula_res import NEGATIVE_SLOPE


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

    def code(self, read: torch.Tensor, lead: tuple) -> torch.Tensor:
        """``c [N, R]`` from this layer's columns of ``x @ read`` (``lead``: x's leading shape, for the
        router's records); the experts' scales are in ``up``."""
        u, z, scores = read.split(self.widths, dim=-1)
        if self.router is not None:
            gates = self.router.gate(scores.reshape(*lead, -1)).reshape(-1, self.router.n_routed)
            if self.ranks is not None:
                z = F.leaky_relu(z, self.slope).view(-1, *self.ranks).mul_(gates.unsqueeze(-1)).view(z.shape)
            else:
                z = (z if self.slope is None else F.leaky_relu(z, self.slope)) * gates.index_select(-1, self.columns)
        return torch.cat([u, z], dim=-1) if u.shape[-1] and z.shape[-1] else (z if z.shape[-1] else u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = F.linear(flat, self.weight, self.bias)
        if self.read is not None:
            y = y.addmm_(self.code(flat @ self.read, x.shape[:-1]), self.up)
        return y.view(*x.shape[:-1], y.shape[-1])


def _read(*rows: torch.Tensor) -> torch.Tensor:
    """``[d_in, sum of rows]``: the matrices that read x, side by side, for ``x @ read``."""
    return torch.cat(rows).T.contiguous()


@torch.no_grad()
def serving_linear(layer: ExpertLinear, fold: bool = False) -> ServingLinear | None:
    """The serving form of one trained layer at its inference stage, or None (kept as trained)."""
    method, weight, bias = layer.method, layer.base.weight, layer.base.bias
    if method == "lora":
        A, B, s = layer.universal.A, layer.universal.B, layer.universal_scale
        if fold:
            return ServingLinear(weight + s * (B @ A), bias, folded=True)
        return ServingLinear(weight, bias, _read(s * A), (A.shape[0], 0), up=B.T.contiguous())
    if not layer.mixing or layer.router is None:  # stage 2 alone, or a router per block
        return None
    router, expand = layer.router, layer.gate_expansion            # [n_routed, R]: each expert's scale on its ranks
    columns, scales = expand.argmax(dim=0), expand.sum(dim=0)
    if method == "molora":
        return ServingLinear(weight, bias, _read(layer.domain.flat_A, router.weight), (0, expand.shape[1]), router,
                             columns, (layer.domain.flat_B * scales).T.contiguous())
    if method == "modula_flan":
        up = torch.cat([layer.universal.B, layer.domain.flat_B], dim=1) * scales
        return ServingLinear(weight, bias, _read(layer.universal.A, layer.domain.flat_A, router.weight),
                             (0, expand.shape[1]), router, columns, up.T.contiguous())
    if method == "modula_res":
        A, B, s = layer.universal.A, layer.universal.B, layer.universal_scale
        K = layer.domain.flat_A @ B @ (s * A)               # A_i h = A_i B* (s* A* x)
        ranks, domain_up = (layer.n_domains, layer.domain.rank), layer.domain.flat_B * layer.domain_scale
        if fold:
            return ServingLinear(weight + s * (B @ A), bias, _read(K, router.weight), (0, K.shape[0]), router, None,
                                 domain_up.T.contiguous(), NEGATIVE_SLOPE, folded=True, ranks=ranks)
        return ServingLinear(weight, bias, _read(s * A, K, router.weight), (A.shape[0], K.shape[0]), router, None,
                             torch.cat([B, domain_up], dim=1).T.contiguous(), NEGATIVE_SLOPE, ranks=ranks)
    return None


def serving_form(model: nn.Module, fold: bool = False) -> nn.Module:
    """``model`` (a finished composition, in eval mode) with its expert layers in serving form, in
    place; ``model.modula_serving_routers`` lists every router that still mixes, for routing reports."""
    from .inject import expert_layers, routers

    model.modula_serving_routers = list(routers(model).values())
    for path, layer in expert_layers(model).items():
        if not isinstance(layer, ExpertLinear) or (served := serving_linear(layer, fold)) is None:
            continue
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, served)
    return model.requires_grad_(False)
