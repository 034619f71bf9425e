"""Injection into real HF causal LMs (Llama and Qwen2 layouts), stages, stacking."""
import pytest
import torch

from modula_ray.errors import ConfigError
from modula_ray.experts import (LinearExpertsConfig, expert_layers, inject, load_balancing_loss, routing_weights,
                                set_stage, spec_of, stack_experts, trainable_parameters)
from modula_ray.models import tiny_model
from tests.helpers import ids, randomise_experts

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "molora", "modula_flan", "modula_res"])
def test_fresh_inject_keeps_logits_exactly(layout, method):
    base, tokenizer = tiny_model(layout)
    before = base(ids(tokenizer)).logits
    model = inject(base, method, ["math", "code"])
    layers = expert_layers(model)
    assert len(layers) == 2 * 7  # 2 blocks x 7 projections
    assert {path.rsplit(".", 1)[-1] for path in layers} == set(ALL7)
    assert torch.equal(model(ids(tokenizer)).logits, before)


# DESIGN stage table: which parameter groups train in each stage.
TABLE = {
    ("modula_res", "universal"): {"universal"}, ("modula_res", "router"): {"router"},
    ("modula_res", "joint"): {"universal", "domain", "router"},
    ("modula_flan", "universal"): {"universal"}, ("modula_flan", "router"): {"router"},
    ("molora", "joint"): {"domain", "router"}, ("lora", "universal"): {"universal"},
}


@pytest.mark.parametrize("method, stage", sorted(TABLE))
def test_set_stage_trains_exactly_the_table(method, stage, tiny_fresh):
    model, _ = tiny_fresh
    inject(model, method, ["math", "code"])
    set_stage(model, stage)
    groups = {name.split(".")[-2] for name in trainable_parameters(model)}
    assert groups == TABLE[(method, stage)]
    n_layers = len(expert_layers(model))
    per_layer = {"universal": 2, "domain": 2, "router": 1}
    assert len(trainable_parameters(model)) == n_layers * sum(per_layer[g] for g in TABLE[(method, stage)])
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n or "embed" in n)


@pytest.mark.parametrize("method", ["modula_res", "modula_flan"])
def test_experts_stage_trains_only_the_single_domain_expert(method, tiny_fresh):
    model, tokenizer = tiny_fresh
    inject(model, method, ["math"])
    randomise_experts(model)
    set_stage(model, "experts")
    assert {n.split(".")[-2] for n in trainable_parameters(model)} == {"domain"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    model(ids(tokenizer)).logits.pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_set_stage_experts_rejects_several_domains(tiny_fresh):
    model, _ = tiny_fresh
    inject(model, "modula_res", ["math", "code"])
    with pytest.raises(ValueError, match="exactly one domain expert"):
        set_stage(model, "experts")


def test_inject_rejects_missing_targets_and_bad_domains(tiny_fresh):
    model, _ = tiny_fresh
    with pytest.raises(ConfigError, match=r"no nn.Linear named \['c_attn'\]") as info:
        inject(model, "modula_res", ["math"], target_modules=["q_proj", "c_attn"])
    assert info.value.field == "target_modules"
    with pytest.raises(ValueError, match="n_domains"):
        inject(model, "modula_res", [])
    with pytest.raises(ValueError, match="method"):
        inject(model, "mystery", ["math"])
    with pytest.raises(ConfigError, match=r"top_k=2 must be in 1\.\.1") as info:
        inject(model, "modula_res", ["math"], top_k=2)
    assert info.value.field == "top_k"
    assert not expert_layers(model)  # nothing was wrapped by the refused calls
    inject(model, "modula_res", ["math"], target_modules=["q_proj"])
    assert len(expert_layers(model)) == 2


@pytest.mark.parametrize("method, foreign", [("mode", {"domain_rank": 4}), ("modula_res", {"mode_blocks": [[0, 1]]})])
def test_inject_takes_only_the_method_s_own_settings(tiny_fresh, method, foreign):
    """No setting of another method is dropped on the way in: it raises, naming the key."""
    with pytest.raises(ConfigError, match=f"method '{method}' has no such setting") as info:
        inject(tiny_fresh[0], method, ["math"], **foreign)
    assert info.value.field == next(iter(foreign))


def test_inject_keeps_the_settings_object_it_was_given(tiny_fresh):
    config = LinearExpertsConfig(target_modules=["q_proj", "v_proj"], domain_rank=3, temperature=0.5)
    model = inject(tiny_fresh[0], "molora", ["math", "code"], config)
    assert spec_of(model).config is config and spec_of(model).target_modules == ["q_proj", "v_proj"]
    layers = expert_layers(model).values()
    assert len(layers) == 4 and all(layer.settings is config for layer in layers)
    assert {layer.domain.A.shape[1] for layer in layers} == {3}
    with pytest.raises(ConfigError, match="takes one ModeConfig"):
        inject(tiny_fresh[0], "mode", ["math"], config)


def test_router_stats_after_forward(tiny_fresh):
    model, tokenizer = tiny_fresh
    inject(model, "modula_flan", ["math", "code"])
    model(ids(tokenizer))
    weights = routing_weights(model)
    assert list(weights) == ["universal", "math", "code"]
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert load_balancing_loss(model).item() == pytest.approx(1.0, abs=1e-5)  # zero routers are balanced


def test_stack_models_equals_direct_n_expert_model():
    """Stacking n single-expert models gives the same mixture as one model built with n experts."""
    singles = []
    for i, domain in enumerate(["math", "code", "medicine"]):
        model, tokenizer = tiny_model()
        inject(model, "modula_res", [domain])
        randomise_experts(model, seed=100 + i)
        singles.append(model)
    with torch.no_grad():  # one shared universal, as after stage 1
        for model in singles[1:]:
            for (name, p), (_, p0) in zip(model.named_parameters(), singles[0].named_parameters()):
                if ".universal." in name:
                    p.copy_(p0)
    stacked = stack_experts(singles)
    assert stacked.modula_spec.domains == ["math", "code", "medicine"]
    layer = expert_layers(stacked)["model.layers.1.mlp.down_proj"]
    assert layer.domain.A.shape[0] == 3
    for i, single in enumerate(singles):
        single_layer = expert_layers(single)["model.layers.1.mlp.down_proj"]
        assert torch.equal(layer.domain.A[i], single_layer.domain.A[0])
        assert torch.equal(layer.domain.B[i], single_layer.domain.B[0])
    assert torch.count_nonzero(layer.router.weight) == 0
    # With a zero router the mixture is h + mean_i expert_i; check against per-expert models.
    set_stage(stacked, "router")
    x = torch.randn(5, layer.base.in_features)
    mixed = layer(x)
    singles_out = []
    for single in singles:
        sl = expert_layers(single)["model.layers.1.mlp.down_proj"]
        sl.set_stage("experts")
        singles_out.append(sl(x))
    h = layer.universal_scale * layer.universal(x)
    expected = layer.base(x) + h + sum(out - layer.base(x) - h for out in singles_out) / 3
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_stack_rejects_different_universals():
    models = []
    for seed in (1, 2):
        model, _ = tiny_model()
        inject(model, "modula_flan", [f"d{seed}"])
        randomise_experts(model, seed=seed)
        models.append(model)
    with pytest.raises(ValueError, match="universal experts differ"):
        stack_experts(models)
