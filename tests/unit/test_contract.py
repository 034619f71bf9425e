"""The method contract (one class per method carries its plan, routing and tensors), the shared
registry, and the lineage checks that keep a composition consistent."""
import json

import pytest
from torch import nn

from modula_ray.compose import PartRef, check_lineage
from modula_ray.config import PipelineConfig, from_dict
from modula_ray.errors import ArtifactError, ConfigError
from modula_ray.experts import (METHODS, forward_parameter_count, inject, method_class, save_part, set_stage,
                                wrap_linear)
from modula_ray.models import tiny_model
from modula_ray.registry import Registry
from tests.helpers import randomise_experts

PLANS = {"lora": (("joint",), ("joint",), "universal"), "molora": (("joint",), ("joint",), "router"),
         "modula_flan": (("universal", "experts", "router"), ("experts", "router"), "router"),
         "modula_res": (("universal", "experts", "router"), ("experts", "router"), "router")}


@pytest.mark.parametrize("method", sorted(PLANS))
def test_each_method_carries_its_plan_routing_and_saved_tensors(method):
    cls = method_class(method)
    assert (cls.stage_plan, cls.add_domain_plan, cls.inference_stage) == PLANS[method]
    assert set(cls.stage_plan) <= set(cls.stages) and cls.inference_stage in cls.stages
    assert cls.routed_names(["a", "b"]) == (["universal", "a", "b"] if method == "modula_flan" else ["a", "b"])
    layer = wrap_linear(nn.Linear(6, 5), method, 2, universal_rank=4, domain_rank=2)
    for part in cls.parts:
        tensors = layer.part_tensors(part, 1 if part == "domain" else None)
        assert tensors and all(t.data_ptr() for t in tensors.values())
        if part == "domain":  # one expert's slice of the stacked tensors, expert axis first
            assert {k: tuple(t.shape) for k, t in tensors.items()} == {
                k: tuple(t.shape[1:]) for k, t in layer.domain.named_parameters()}
    for missing in {"universal", "domain", "router", "nonsense"} - set(cls.parts):
        with pytest.raises(ValueError, match=f"has no '{missing}' part"):
            layer.part_tensors(missing)


def test_registry_suggests_the_closest_name_and_config_reads_it():
    with pytest.raises(ConfigError, match=r"unknown method 'modula_rse'; did you mean 'modula_res'") as info:
        method_class("modula_rse")
    assert info.value.field == "method"
    with pytest.raises(ConfigError, match=r"did you mean 'medicine'") as info:
        from_dict(PipelineConfig, {"domains": ["math", "medicin"]})
    assert info.value.field == "domains"
    registry = Registry("widget", "name")

    @registry.register
    class Spanner:
        name = "spanner"

    assert registry.get("spanner") is Spanner and list(registry) == ["spanner"]
    with pytest.raises(TypeError, match="registered twice"):
        registry.register(type("Other", (), {"name": "spanner"}))
    assert set(METHODS) == set(PLANS) | {"mode"}  # mode wraps blocks, not linears: tests/unit/test_mode.py


def test_each_method_registers_its_settings_class():
    """One class per method owns its keys: the LoRA family's ranks, lora's lack of a router, MoDE's spans."""
    from modula_ray.experts import ExpertsConfig, LinearExpertsConfig, config_keys

    classes = {name: cls.config_class.__name__ for name, cls in METHODS.items()}
    assert classes == {"lora": "LoraConfig", "molora": "LinearExpertsConfig", "modula_flan": "LinearExpertsConfig",
                       "modula_res": "LinearExpertsConfig", "mode": "ModeConfig"}
    assert all(issubclass(cls.config_class, ExpertsConfig) for cls in METHODS.values())
    assert config_keys(ExpertsConfig) == ["target_modules", "top_k", "temperature", "router_bias"]
    assert set(config_keys(LinearExpertsConfig)) - set(config_keys(ExpertsConfig)) == {
        "universal_rank", "domain_rank", "universal_alpha", "domain_alpha", "dropout", "router_placement"}
    with pytest.raises(ConfigError, match="did you mean 'domain_rank'") as info:
        method_class("modula_res").configure(domian_rank=4)
    assert info.value.field == "domian_rank"


@pytest.mark.parametrize("method, stage, inactive", [("modula_res", "universal", ("domain", "router")),
                                                     ("modula_res", "experts", ("router",)),
                                                     ("modula_flan", "experts", ("universal", "router")),
                                                     ("modula_flan", "router", ())])
def test_forward_parameters_leave_out_inactive_experts(method, stage, inactive):
    model, _ = tiny_model()
    base = forward_parameter_count(model)
    inject(model, method, ["math"], universal_rank=4, domain_rank=2)
    set_stage(model, stage)
    layers = [m for m in model.modules() if hasattr(m, "active_parts")]
    adapters = sum(p.numel() for layer in layers for part in layer.parts if part not in inactive
                   for p in getattr(layer, part).parameters())
    assert forward_parameter_count(model) == base + adapters
    embeddings = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert base == sum(p.numel() for p in tiny_model()[0].parameters()) - (0 if tied else embeddings)


def _parts(tmp_path, universal_seed, expert_universal_seed):
    """A universal part, and a math expert trained over the universal of another seed."""
    def saved(seed, part, domain=None, metadata=None):
        model, _ = tiny_model()
        inject(model, "modula_res", ["math"], universal_rank=4, domain_rank=2)
        randomise_experts(model, seed=seed)
        return save_part(model, part, tmp_path / f"{part}-{seed}-{domain}", domain=domain, metadata=metadata)

    universal = saved(universal_seed, "universal")
    trained_over = json.loads((saved(expert_universal_seed, "universal") / "config.json").read_text())["sha256"]
    expert = saved(7, "domain", "math", {"universal_sha256": trained_over})
    return [PartRef("universal", str(universal)), PartRef("domain", str(expert), "math")]


def test_lineage_accepts_experts_trained_over_this_universal(tmp_path):
    check_lineage(_parts(tmp_path, 1, 1))


def test_lineage_refuses_an_expert_trained_over_another_universal(tmp_path):
    parts = _parts(tmp_path, 1, 2)
    with pytest.raises(ArtifactError, match=r"expert 'math' was trained over the universal expert with sha256 "
                                            r"[0-9a-f]{12}\.\.\., but .*universal-1-None has sha256 [0-9a-f]{12}"):
        check_lineage(parts)
