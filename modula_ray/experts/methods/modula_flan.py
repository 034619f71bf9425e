"""``modula_flan`` (MoDULA-Flan, paper eq. 5-8): the universal expert is one of the routed experts.

``y = W0 x + sum_{j in {*, 1..n}} g_j(x) s_j B_j A_j x`` with ``g = softmax(W_R x / tau)`` over
n + 1 experts; router index 0 is the universal expert. In stage ``experts`` the universal
expert is inactive (paper eq. 4): ``y = W0 x + s B_1 A_1 x``. Three stages; adding a domain
trains one expert and the router.
"""
import torch

from ..layer import METHODS, ExpertLinear, LinearExpertsConfig
from ..reference import Terms


@METHODS.register
class ModulaFlanLinear(ExpertLinear):
    method = "modula_flan"
    config_class = LinearExpertsConfig  # ranks, alphas, dropout, router
    parts = ("universal", "domain", "router")
    stages = ("universal", "experts", "router", "joint")
    stage_plan = ("universal", "experts", "router")
    add_domain_plan = ("experts", "router")
    fixed_routed = ("universal",)
    peft_parts = ("universal", "domain")

    def active_parts(self):
        return ("domain",) if self.stage == "experts" else super().active_parts()

    def rank_code(self, x):
        if self.stage == "universal":
            return self.universal_code(x)
        if not self.mixing:  # stage experts: the domain expert alone
            (z,), _ = self.read(x, self.domain.flat_A)
            return self.gate_ranks(z, None), self.fused("up", lambda: self.domain.flat_B)
        (ranks,), gates = self.read(x, self.universal.A, self.domain.flat_A, joined=True)
        code = self.gate_ranks(ranks, gates)
        return code, self.fused("up", lambda: torch.cat([self.universal.B, self.domain.flat_B], dim=1))

    def reference(self, x):
        t = Terms(self)
        y = t.base(x)
        if self.stage == "universal":
            return y + t.universal(x)
        if not t.mixing:
            return y + t.domain(0, x)
        gates = t.gates(x)
        y = y + gates[..., 0:1] * t.universal(x)
        for i in range(t.n):
            y = y + gates[..., i + 1:i + 2] * t.domain(i, x)
        return y

    def serving(self, fold=False):
        """Never folded: the universal expert is gated by ``g_0(x)``, so ``W0 + s* B* A*`` would still
        need a ``(g_0 - 1)`` path of the same cost. One read of ``[A*; flat_A; W_R]``, scales in U."""
        from ..serving import ServingLinear, gated_columns, side_by_side

        if not self.serving_mixes():
            return None
        columns, scales = gated_columns(self)
        up = torch.cat([self.universal.B, self.domain.flat_B], dim=1) * scales
        return ServingLinear(self.base.weight, self.base.bias,
                             side_by_side(self.universal.A, self.domain.flat_A, self.router.weight),
                             (0, len(columns)), self.router, columns, up.T.contiguous())
