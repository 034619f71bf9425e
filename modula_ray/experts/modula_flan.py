"""``modula_flan`` (MoDULA-Flan, paper eq. 5-8): the universal expert is one of the routed experts.

``y = W0 x + sum_{j in {*, 1..n}} g_j(x) s_j B_j A_j x`` with ``g = softmax(W_R x / tau)`` over
n + 1 experts; router index 0 is the universal expert. In stage ``experts`` the universal
expert is inactive (paper eq. 4): ``y = W0 x + s B_1 A_1 x``.
"""
from .layer import ExpertLinear
from .registry import register_method


@register_method
class ModulaFlanLinear(ExpertLinear):
    method = "modula_flan"
    parts = ("universal", "domain", "router")
    stages = ("universal", "experts", "router", "joint")

    @classmethod
    def n_routed_for(cls, n_domains: int) -> int:
        return n_domains + 1

    def delta(self, x):
        xd = self.dropout(x)
        if self.stage == "universal":
            return self.universal_scale * self.universal(xd)
        z = self.domain.down(xd)
        if not self.mixing:
            return self.mix_domains(z, self.routed_gates(x))
        gates = self.router(x)
        universal = self.universal(xd) * (self.universal_scale * gates[..., :1])
        return universal + self.mix_domains(z, gates[..., 1:])
