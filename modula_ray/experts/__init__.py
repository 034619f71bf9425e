"""Mixture-of-LoRA-experts layers: ``lora``, ``molora``, ``modula_flan``, ``modula_res``.

Public API::

    wrap_linear(base, method, n_domains, ...)   one frozen nn.Linear -> ExpertLinear
    inject(model, method, domains, ...)         wrap every target linear of an HF causal LM
    set_stage(model, stage)                     universal | experts | router | joint
    stack_experts(layers_or_models)             n single-expert -> one n-expert
    save_part / load_part / export_peft         artifacts (DESIGN §2)
"""
from .inject import (DEFAULT_TARGETS, ExpertSpec, expert_layers, inject, load_balancing_loss, routing_weights,
                     set_stage, spec_of, trainable_parameters)
from .layer import STAGES, ExpertLinear
from .peft_export import export_peft
from .reference import reference_forward
from .registry import METHODS, register_method, wrap_linear
from .serialization import load_part, read_part, save_part
from .stacking import stack_experts

__all__ = [
    "DEFAULT_TARGETS", "ExpertLinear", "ExpertSpec", "METHODS", "STAGES", "expert_layers", "export_peft", "inject",
    "load_balancing_loss", "load_part", "read_part", "reference_forward", "register_method", "routing_weights",
    "save_part", "set_stage", "spec_of", "stack_experts", "trainable_parameters", "wrap_linear",
]
