"""``molora`` baseline (Zadouri et al.): ``y = W0 x + sum_i g_i(x) s B_i A_i x``, ``g = softmax(W_R x / tau)``.

No universal expert; experts and router train together in one ``joint`` stage.
"""
from .layer import ExpertLinear
from .registry import register_method


@register_method
class MoLoRALinear(ExpertLinear):
    method = "molora"
    parts = ("domain", "router")
    stages = ("experts", "router", "joint")

    def delta(self, x):
        return self.mix_domains(self.domain.down(self.dropout(x)), self.routed_gates(x))
