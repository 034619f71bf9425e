"""``finance``: MMLU accounting and economics; the domain "added later" to show pluggability."""
from . import register_source
from .mmlu_base import MMLUSource


@register_source
class FinanceSource(MMLUSource):
    domain = "finance"
    description = "MMLU professional accounting, econometrics, high-school macro- and microeconomics"
    subjects = ("professional accounting", "econometrics", "high school macroeconomics",
                "high school microeconomics")
