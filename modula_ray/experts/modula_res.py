"""``modula_res`` (MoDULA-Res, paper eq. 9-12): domain experts refine the universal output.

``h = s* B* A* x``;  ``y = W0 x + h + sum_i g_i(x) s B_i LeakyReLU(A_i h)``, with
``g = softmax(W_R x / tau)`` over the n domain experts. The router reads ``x``, not ``h``;
``A_i`` is ``[r_d, d_out]`` because it reads ``h``. LeakyReLU slope is 0.01.
"""
import torch.nn.functional as F

from .layer import ExpertLinear
from .registry import register_method

NEGATIVE_SLOPE = 0.01


@register_method
class ModulaResLinear(ExpertLinear):
    method = "modula_res"
    parts = ("universal", "domain", "router")
    stages = ("universal", "experts", "router", "joint")
    domain_reads_h = True

    def delta(self, x):
        h = self.universal_scale * self.universal(self.dropout(x))
        if self.stage == "universal":
            return h
        z = F.leaky_relu(self.domain.down(self.dropout(h)), NEGATIVE_SLOPE)
        return h + self.mix_domains(z, self.routed_gates(x))
