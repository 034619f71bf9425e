"""Expert modules; one file per method in ``methods/`` (``lora``, ``molora``, ``modula_flan``,
``modula_res`` wrap linears; ``mode`` wraps spans of transformer blocks), each registered in
``METHODS`` and keeping the contract of ``contract.py``.

Public API::

    wrap_linear(base, method, n_domains, ...)   one frozen nn.Linear -> ExpertLinear
    inject(model, method, domains, config)      wrap every target linear of an HF causal LM
                                                (config: the method's config_class, or keyword settings)
    set_stage(model, stage)                     universal | experts | router | joint
    stack_experts(layers_or_models)             n single-expert -> one n-expert
    save_part / load_part / export_peft         artifacts (DESIGN §2)
"""
from . import methods  # noqa: F401  (registers every method in METHODS)
from .contract import DEFAULT_TARGETS, METHODS, STAGES, ExpertsConfig, config_keys, method_class
from .inject import (ExpertSpec, expert_layers, forward_parameter_count, inject, last_position_gates,
                     load_balancing_loss, routing_weights, set_stage, spec_of, supervised_routing_loss,
                     trainable_parameters)
from .layer import ExpertLinear, LinearExpertsConfig, wrap_linear
from .peft_export import export_peft
from .reference import reference_forward
from .serialization import load_part, read_part, save_part
from .stacking import stack_experts

__all__ = [
    "DEFAULT_TARGETS", "ExpertLinear", "ExpertSpec", "ExpertsConfig", "LinearExpertsConfig", "METHODS", "STAGES",
    "config_keys", "expert_layers", "export_peft", "forward_parameter_count", "inject", "last_position_gates",
    "load_balancing_loss", "supervised_routing_loss", "load_part", "method_class", "read_part", "reference_forward", "routing_weights",
    "save_part", "set_stage", "spec_of", "stack_experts", "trainable_parameters", "wrap_linear",
]
