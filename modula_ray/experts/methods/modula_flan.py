"""``modula_flan`` (MoDULA-Flan, paper eq. 5-8): the universal expert is one of the routed experts.

``y = W0 x + sum_{j in {*, 1..n}} g_j(x) s_j B_j A_j x`` with ``g = softmax(W_R x / tau)`` over
n + 1 experts; router index 0 is the universal expert. In stage ``experts`` the universal
expert is inactive (paper eq. 4): ``y = W0 x + s B_1 A_1 x``. Three stages; adding a domain
trains one expert and the router.
"""
from ..layer import METHODS, ExpertLinear
from ..reference import Terms


@METHODS.register
class ModulaFlanLinear(ExpertLinear):
    method = "modula_flan"
    parts = ("universal", "domain", "router")
    stages = ("universal", "experts", "router", "joint")
    stage_plan = ("universal", "experts", "router")
    add_domain_plan = ("experts", "router")
    fixed_routed = ("universal",)
    peft_parts = ("universal", "domain")

    def active_parts(self):
        return ("domain",) if self.stage == "experts" else super().active_parts()

    def delta(self, x):
        xd = self.dropout(x)
        if self.stage == "universal":
            return self.universal_scale * self.universal(xd)
        z = self.domain.down(xd)
        if not self.mixing:
            return self.mix_domains(z, self.routed_gates(x))
        gates = self.routed_gates(x)
        universal = self.universal(xd) * (self.universal_scale * gates[..., :1])
        return universal + self.mix_domains(z, gates[..., 1:])

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
