"""``lora`` baseline: one LoRA, ``y = W0 x + s B A x`` with ``s = alpha / r``.

It is stored as the ``universal`` part so it exports, loads and counts like one. One ``joint``
stage on all the data; adding a domain retrains it on the new mix.
"""
from ..layer import METHODS, ExpertLinear
from ..reference import Terms


@METHODS.register
class LoRALinear(ExpertLinear):
    method = "lora"
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
