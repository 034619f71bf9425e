"""``lora`` baseline: one LoRA, ``y = W0 x + s B A x`` with ``s = alpha / r``.

It is stored as the ``universal`` part so it exports, loads and counts like one. One ``joint``
stage on all the data; adding a domain retrains it on the new mix.
"""
from dataclasses import dataclass

from ...errors import require
from ..layer import METHODS, ExpertLinear, LinearExpertsConfig
from ..reference import Terms


@dataclass
class LoraConfig(LinearExpertsConfig):
    """lora reads ``universal_rank`` and ``universal_alpha`` (its one LoRA); it has no router, so
    ``top_k`` stays null and ``router_placement`` layer."""

    def __post_init__(self):
        super().__post_init__()
        require(self.top_k is None, "top_k", "method 'lora' has no router")
        require(self.router_placement == "layer", "router_placement", "method 'lora' has no router")


@METHODS.register
class LoRALinear(ExpertLinear):
    method = "lora"
    config_class = LoraConfig
    parts = ("universal",)
    stages = ("universal", "joint")
    stage_plan = ("joint",)
    add_domain_plan = ("joint",)
    inference_stage = "universal"
    peft_parts = ("universal",)

    def rank_code(self, x):
        return self.universal_code(x)

    def reference(self, x):
        t = Terms(self)
        return t.base(x) + t.universal(x)

    def serving(self, fold=False):
        """Folded: ``W0 + s B A``, a plain linear (peft's merge); else one read of ``s A`` and B up."""
        from ..serving import ServingLinear, side_by_side

        A, B, s = self.universal.A, self.universal.B, self.universal_scale
        if fold:
            return ServingLinear(self.base.weight + s * (B @ A), self.base.bias, folded=True)
        return ServingLinear(self.base.weight, self.base.bias, side_by_side(s * A), (A.shape[0], 0), up=B.T.contiguous())
