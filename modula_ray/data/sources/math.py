"""``math``: reasoning-gym arithmetic and algebra generators, graded by their own scorers."""
from . import register_source
from .reasoning_gym_base import ReasoningGymSource


@register_source
class MathSource(ReasoningGymSource):
    domain = "math"
    description = "reasoning-gym gsm_symbolic, basic_arithmetic, chain_sum, fraction_simplification, ..."
    generators = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "fraction_simplification", "decimal_arithmetic",
                  "simple_equations", "gcd", "lcm", "prime_factorization")
