"""``lora`` baseline: one LoRA, ``y = W0 x + s B A x`` with ``s = alpha / r``.

It is stored as the ``universal`` part so it exports, loads and counts like one.
"""
from .layer import ExpertLinear
from .registry import register_method


@register_method
class LoRALinear(ExpertLinear):
    method = "lora"
    parts = ("universal",)
    stages = ("universal", "joint")

    def delta(self, x):
        return self.universal_scale * self.universal(self.dropout(x))
