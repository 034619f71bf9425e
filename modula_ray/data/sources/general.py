"""``general``: reasoning-gym families outside every domain (words, logic, ciphers), for the universal expert."""
from . import register_source
from .reasoning_gym_base import ReasoningGymSource


@register_source
class GeneralSource(ReasoningGymSource):
    domain = "general"
    description = "reasoning-gym word, logic and cipher families (no maths, no code)"
    generators = ("spell_backward", "letter_counting", "word_sorting", "syllogism", "family_relationships",
                  "propositional_logic", "word_sequence_reversal", "caesar_cipher", "sentence_reordering",
                  "knights_knaves")
