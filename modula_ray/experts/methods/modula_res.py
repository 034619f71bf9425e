"""``modula_res`` (MoDULA-Res, paper eq. 9-12): domain experts refine the universal output.

``h = s* B* A* x``;  ``y = W0 x + h + sum_i g_i(x) s B_i LeakyReLU(A_i h)``, with
``g = softmax(W_R x / tau)`` over the n domain experts. The router reads ``x``, not ``h``;
``A_i`` is ``[r_d, d_out]`` because it reads ``h``. LeakyReLU slope is 0.01. Three stages;
adding a domain trains one expert and the router.
"""
import torch
import torch.nn.functional as F

from ..layer import METHODS, ExpertLinear, LinearExpertsConfig
from ..reference import Terms

NEGATIVE_SLOPE = 0.01


@METHODS.register
class ModulaResLinear(ExpertLinear):
    method = "modula_res"
    config_class = LinearExpertsConfig  # ranks, alphas, dropout, router
    parts = ("universal", "domain", "router")
    stages = ("universal", "experts", "router", "joint")
    stage_plan = ("universal", "experts", "router")
    add_domain_plan = ("experts", "router")
    domain_reads = "h"
    peft_parts = ("universal",)  # domain experts read h through a LeakyReLU: not LoRA-shaped

    def rank_code(self, x):
        (u,), gates = self.read(x, self.universal.A)
        u = u * self.universal_scale
        if self.stage == "universal":
            return u, self.universal.B
        if self.dropping:  # A_i reads dropout(h), so h = B* u [T, d_out] is formed
            z = self.dropout(u @ self.universal.B.T) @ self.domain.flat_A.T
        else:  # A_i h = (A_i B*) u: a [n r, r*] product instead of h
            z = u @ self.fused("refine", lambda: self.domain.flat_A @ self.universal.B).T
        code = torch.cat([u, self.gate_ranks(F.leaky_relu(z, NEGATIVE_SLOPE), gates)], dim=-1)
        return code, self.fused("up", lambda: torch.cat([self.universal.B, self.domain.flat_B], dim=1))

    def reference(self, x):
        t = Terms(self)
        h = t.universal(x)
        y = t.base(x) + h
        if self.stage == "universal":
            return y
        gates = t.gates(x) if t.mixing else None
        for i in range(t.n):
            refined = t.domain(i, h, lambda z: F.leaky_relu(z, NEGATIVE_SLOPE))
            y = y + (gates[..., i:i + 1] if t.mixing else 1.0) * refined
        return y

    def serving(self, fold=False):
        """``A_i h = A_i B* (s* A* x)``: the domain experts read ``K = s* flat_A B* A*`` straight from x.
        Folded, ``W0 + s* B* A*`` carries the universal expert; else ``s* A*`` is read beside K and
        B* goes up beside the domain experts' B (their scale in it)."""
        from ..serving import ServingLinear, side_by_side

        if not self.serving_mixes():
            return None
        A, B, s, router = self.universal.A, self.universal.B, self.universal_scale, self.router
        K = self.domain.flat_A @ B @ (s * A)
        ranks, domain_up = (self.n_domains, self.domain.rank), self.domain.flat_B * self.domain_scale
        if fold:
            return ServingLinear(self.base.weight + s * (B @ A), self.base.bias, side_by_side(K, router.weight),
                                 (0, K.shape[0]), router, None, domain_up.T.contiguous(), NEGATIVE_SLOPE, folded=True,
                                 ranks=ranks)
        return ServingLinear(self.base.weight, self.base.bias, side_by_side(s * A, K, router.weight),
                             (A.shape[0], K.shape[0]), router, None, torch.cat([B, domain_up], dim=1).T.contiguous(),
                             NEGATIVE_SLOPE, ranks=ranks)
