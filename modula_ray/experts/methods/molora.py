"""``molora`` baseline (Zadouri et al.): ``y = W0 x + sum_i g_i(x) s B_i A_i x``, ``g = softmax(W_R x / tau)``.

No universal expert; experts and router train together in one ``joint`` stage, so adding a
domain retrains every expert and the router.
"""
from ..layer import METHODS, ExpertLinear, LinearExpertsConfig
from ..reference import Terms


@METHODS.register
class MoLoRALinear(ExpertLinear):
    method = "molora"
    config_class = LinearExpertsConfig  # ranks, alphas, dropout, router
    parts = ("domain", "router")
    stages = ("experts", "router", "joint")
    stage_plan = ("joint",)
    add_domain_plan = ("joint",)
    peft_parts = ("domain",)

    def rank_code(self, x):
        (z,), gates = self.read(x, self.domain.flat_A)
        return self.gate_ranks(z, gates), self.fused("up", lambda: self.domain.flat_B)

    def reference(self, x):
        t = Terms(self)
        y, gates = t.base(x), t.gates(x) if t.mixing else None
        for i in range(t.n):
            y = y + (gates[..., i:i + 1] if t.mixing else 1.0) * t.domain(i, x)
        return y

    def serving(self, fold=False):
        """Nothing to fold (no universal expert): one read of ``[flat_A; W_R]``, the scales in U."""
        from ..serving import ServingLinear, gated_columns, side_by_side

        if not self.serving_mixes():
            return None
        columns, scales = gated_columns(self)
        return ServingLinear(self.base.weight, self.base.bias, side_by_side(self.domain.flat_A, self.router.weight),
                             (0, len(columns)), self.router, columns, (self.domain.flat_B * scales).T.contiguous())
