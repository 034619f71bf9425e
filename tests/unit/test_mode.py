"""MoDE blocks: the base model unchanged at injection, the stages' trainability, the plain loop
reference, saving and loading, and cached generation."""
import copy

import pytest
import torch

from modula_ray.errors import ArtifactError, ConfigError
from modula_ray.experts import (expert_layers, forward_parameter_count, inject, load_part, save_part, set_stage,
                                stack_experts)
from modula_ray.experts.methods.mode import ModeBlock, ModeConfig, SpanPassThrough, default_spans
from modula_ray.models import load_base
from tests.helpers import assert_same_gradients, ids

SPANS = [[0, 1], [1, 2]]  # the tiny model has 2 layers: one block per layer


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny-llama")


def _mode(tiny, domains=("math", "code"), spans=SPANS, seed=None, **kw):
    model = inject(copy.deepcopy(tiny[0]), "mode", list(domains), mode_blocks=spans, **kw)
    if seed is not None:  # experts and gates away from the backbone, so no term hides
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".experts." in name or ".gate." in name:
                    p.add_(torch.randn(p.shape, generator=g) * (0.5 if ".gate." in name else 0.05))
    return model.eval()


def test_mode_carries_its_plan_and_routing():
    from modula_ray.experts import method_class

    cls = method_class("mode")
    assert (cls.wraps, cls.stage_plan, cls.add_domain_plan, cls.inference_stage) == (
        "blocks", ("experts", "joint"), ("experts", "router"), "router")
    assert cls.routed_names(["a", "b"]) == ["backbone", "a", "b"] and cls.parts == ("domain", "router")


def test_fresh_injection_reproduces_the_base_logits_exactly(tiny):
    model, tokenizer = tiny
    x = ids(tokenizer)
    with torch.no_grad():
        base = model(x).logits
        injected = _mode(tiny, domains=["math"])
        assert torch.equal(injected(x).logits, base)
        assert torch.equal(_mode(tiny, top_k=2)(x).logits, base)  # whatever the gate


def test_names_blocks_and_pass_throughs(tiny):
    model = _mode(tiny)
    layers = model.model.layers
    assert isinstance(layers[0], ModeBlock) and isinstance(layers[1], ModeBlock) and len(layers) == 2
    names = [n for n, _ in model.named_parameters()]
    assert "model.layers.0.gate.weight" in names and "model.layers.0.experts.1.0.mlp.up_proj.weight" in names
    assert all(".experts." in n or ".gate." in n or ".backbone." in n for n in names if n.startswith("model.layers."))
    one = inject(copy.deepcopy(load_base("tiny-llama")[0]), "mode", ["math"], mode_blocks=[[0, 2]])
    assert isinstance(one.model.layers[0], ModeBlock) and isinstance(one.model.layers[1], SpanPassThrough)
    assert len(one.model.layers[0].experts[0]) == 2
    assert default_spans(30, 3, 2) == [[8, 10], [18, 20], [28, 30]]


def test_stages_train_exactly_their_parts(tiny):
    single = _mode(tiny, domains=["math"])
    set_stage(single, "experts")
    trainable = [n for n, p in single.named_parameters() if p.requires_grad]
    assert trainable and all(".experts.0." in n for n in trainable)
    assert sum(p.numel() for n, p in single.named_parameters() if p.requires_grad) == sum(
        p.numel() for n, p in single.named_parameters() if ".backbone." in n)  # a full copy of the spans
    full = _mode(tiny)
    set_stage(full, "joint")
    groups = {n.split(".")[3] for n, p in full.named_parameters() if p.requires_grad}
    assert groups == {"experts", "gate"}
    assert not any(p.requires_grad for n, p in full.named_parameters() if ".backbone." in n or "embed" in n)
    set_stage(full, "router")
    assert [n for n, p in full.named_parameters() if p.requires_grad] == ["model.layers.0.gate.weight",
                                                                           "model.layers.1.gate.weight"]
    with pytest.raises(ValueError, match="exactly one domain"):
        set_stage(full, "experts")
    set_stage(single, "experts")  # the expert runs in place of the backbone: it alone counts
    mixing = forward_parameter_count(_mode(tiny, domains=["math"]))
    assert forward_parameter_count(single) < mixing


@pytest.mark.parametrize("top_k", [None, 2])
def test_block_mixture_equals_the_plain_loop_outputs_and_gradients(tiny, top_k):
    # float64: the check is about the maths; fp32 sums in another order differ by ~5e-6 on these gradients
    fast_model, slow_model = _mode(tiny, seed=3, top_k=top_k).double(), _mode(tiny, seed=3, top_k=top_k).double()
    fast, slow = expert_layers(fast_model)["model.layers.0"], expert_layers(slow_model)["model.layers.0"]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rotary = fast_model.model.rotary_emb(x, torch.arange(5)[None].expand(2, -1))
    kwargs = {"position_embeddings": rotary, "attention_mask": None, "position_ids": torch.arange(5)[None]}
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_slow = fast(xf, **kwargs), slow.reference(xs, **kwargs)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(y_fast)
    (y_fast * w).sum().backward()
    (y_slow * w).sum().backward()
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-9, atol=1e-10)
    assert assert_same_gradients(fast.named_parameters(), slow.named_parameters(), rtol=1e-9, atol=1e-10) > 0
    assert fast.gate.weight.grad.abs().sum() > 0


def test_cached_generation_equals_uncached(tiny):
    model = _mode(tiny, seed=5)
    prompt = ids(tiny[1])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
        base = tiny[0].generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the experts do change the model


def test_slot_decoding_equals_generate_rows_joining_and_leaving(tiny, monkeypatch):
    """mode's expert layers keep caches of their own: over serving's slots they move with the model's,
    so rows that join late and leave early decode what ``generate`` does alone."""
    from modula_ray.serve import slots
    from modula_ray.serve.generation import GenerationRequest, generate_batch

    monkeypatch.setattr(slots, "GROW", 4)  # the caches grow (a copy) several times on the way
    model, tokenizer = _mode(tiny, seed=5), tiny[1]
    prompts = [tokenizer(p).input_ids for p in ["the cat sat", "two plus two is", "x", "a b c d e f"]]
    requests = [GenerationRequest(p, max_tokens=4 + 3 * i, ignore_eos=True) for i, p in enumerate(prompts)]
    results = generate_batch(model, tokenizer, requests, slots=2)
    with torch.no_grad():
        for request, result in zip(requests, results):
            expected = model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=request.max_tokens,
                                      do_sample=False, use_cache=True, eos_token_id=None)
            assert result.token_ids == expected[0, len(request.prompt_ids):].tolist()


def test_parts_round_trip_and_mismatches_are_typed_errors(tiny, tmp_path):
    source = _mode(tiny, seed=7)
    save_part(source, "domain", tmp_path / "math", domain="math")
    save_part(source, "router", tmp_path / "gates")
    target = _mode(tiny, domains=["code", "math"])  # math at another index
    load_part(target, "domain", tmp_path / "math", domain="math")
    same_order = _mode(tiny)
    load_part(same_order, "router", tmp_path / "gates")
    for path, block in expert_layers(source).items():
        theirs = expert_layers(target)[path]
        mine = dict(block.experts[0].named_parameters())
        assert all(torch.equal(mine[k], v) for k, v in theirs.experts[1].named_parameters())
        assert torch.equal(block.gate.weight, expert_layers(same_order)[path].gate.weight)
    with pytest.raises(ArtifactError, match="routed is"):  # gates trained over another order
        load_part(target, "router", tmp_path / "gates")
    other_spans = _mode(tiny, domains=["math"], spans=[[0, 2]])
    with pytest.raises(ArtifactError, match="span"):
        load_part(other_spans, "domain", tmp_path / "math", domain="math")
    (tmp_path / "math" / "adapter.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ArtifactError, match="sha256"):
        load_part(target, "domain", tmp_path / "math", domain="math")


def test_stacking_single_domain_blocks(tiny):
    math, code = _mode(tiny, domains=["math"], seed=1), _mode(tiny, domains=["code"], seed=2)
    stacked = stack_experts([math, code])
    block = expert_layers(stacked)["model.layers.0"]
    assert block.n_domains == 2 and block.gate.weight.shape[0] == 3
    assert torch.equal(block.experts[1][0].mlp.up_proj.weight, expert_layers(code)["model.layers.0"].experts[0][0].mlp.up_proj.weight)
    stacked(ids(tiny[1]))


@pytest.mark.parametrize("kwargs, field, message", [
    ({"mode_blocks": [[1, 3]]}, "mode_blocks", r"span \[1, 3\) is outside the model's 2 layers"),
    ({"mode_blocks": [[0, 2], [1, 2]]}, "mode_blocks", "overlaps"),
    ({"mode_blocks": [[1, 0]]}, "mode_blocks[0]", "0 <= start < end"),
    ({"mode_blocks": None, "mode_num_blocks": 3}, "mode_num_blocks",
     "mode_num_blocks x mode_block_layers = 3 x 2 exceeds the model's 2 layers"),
    ({"mode_block_layers": 0}, "mode_block_layers", "must be >= 1"),
    ({"top_k": 4}, "top_k", r"top_k=4 must be in 1\.\.3"),
])
def test_bad_blocks_are_config_errors_naming_the_setting(tiny, kwargs, field, message):
    kw = {"mode_blocks": SPANS, **kwargs}
    with pytest.raises(ConfigError, match=message) as info:
        inject(copy.deepcopy(tiny[0]), "mode", ["math", "code"], **kw)
    assert info.value.field == field


def test_mode_settings_are_its_own_config_class():
    """MoDE's spans live in ModeConfig, the gate settings are the shared ones; its gates sit per block."""
    from modula_ray.experts import method_class

    config = method_class("mode").configure(mode_num_blocks=2, mode_block_layers=1, temperature=0.5)
    assert isinstance(config, ModeConfig) and config.router_placement == "block"
    assert config.spans(4) == [[1, 2], [3, 4]] and config.spans(30) == [[14, 15], [29, 30]]
    with pytest.raises(ConfigError, match="mixes attention types") as info:
        ModeConfig(mode_blocks=[[0, 2]]).spans(2, ["full_attention", "sliding_attention"])
    assert info.value.field == "mode_blocks"
