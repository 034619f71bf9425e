"""Stack single-expert layers (or models) into one n-expert layer (or model): stage 3's input.

Domain experts are concatenated along the expert axis. The universal expert and the
frozen base must be identical across inputs (stage 2 never changes them); the router (per
layer or per block) is new and zero-initialised, because a router only makes sense for the stacked set.
"""
from __future__ import annotations

import copy

from .inject import ExpertSpec, expert_layers, set_stage, spec_of
from .contract import ExpertModule
from .placement import attach_block_routers


def _stack_layers(layers: list[ExpertModule], where: str = "layer") -> ExpertModule:
    return type(layers[0]).stack(layers, where=where)


def stack_experts(items: list, domains: list[str] | None = None):
    """n single-expert layers -> one n-expert layer; n injected models -> one stacked model.

    For models, the result is a copy of the first model's skeleton whose expert layers are
    stacked; ``domains`` defaults to the concatenation of the models' domain lists.
    """
    items = list(items)
    if not items:
        raise ValueError("stack_experts: nothing to stack")
    if all(isinstance(item, ExpertModule) for item in items):
        return _stack_layers(items)
    specs = [spec_of(model) for model in items]
    names = [name for spec in specs for name in spec.domains]
    domains = list(domains) if domains is not None else names
    if len(domains) != len(names) or len(set(domains)) != len(domains):
        raise ValueError(f"domains: need {len(names)} distinct names for the stacked experts, got {domains}")
    layer_maps = [expert_layers(model) for model in items]
    if any(set(m) != set(layer_maps[0]) for m in layer_maps[1:]):
        raise ValueError("stack_experts: the models wrap different modules")
    stacked_model = copy.deepcopy(items[0])
    for path, own_layer in expert_layers(stacked_model).items():
        parent_path, _, attr = path.rpartition(".")
        layer = _stack_layers([own_layer] + [m[path] for m in layer_maps[1:]], where=path)
        setattr(stacked_model.get_submodule(parent_path), attr, layer)
    spec = specs[0]
    stacked_model.modula_spec = ExpertSpec(spec.method, domains, spec.config)
    if spec.method_class.wraps == "linear" and spec.config.router_placement == "block":  # a larger router per block
        attach_block_routers(stacked_model, expert_layers(stacked_model), len(spec.method_class.routed_names(domains)),
                             spec.config)
    return set_stage(stacked_model, "joint")
