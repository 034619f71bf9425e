"""Router placement 'block': one router per transformer block, read by every adapted layer in it."""
import copy

import pytest
import torch
from torch import nn

from modula_ray.errors import ArtifactError
from modula_ray.experts import (expert_layers, forward_parameter_count, inject, load_part, reference_forward,
                                save_part, set_stage, stack_experts, wrap_linear)
from modula_ray.experts.inject import routers
from modula_ray.experts.placement import BlockRouter, block_routers
from modula_ray.models import load_base
from tests.helpers import assert_same_gradients, ids, randomise_experts

D_MODEL, D_IN, D_OUT, N = 8, 12, 10, 3
ROUTED_METHODS = ["molora", "modula_flan", "modula_res"]


def _layer_with_block_router(method, n=N, seed=1, **kw):
    torch.manual_seed(seed)
    layer = wrap_linear(nn.Linear(D_IN, D_OUT), method, n, router_placement="block", **kw)
    router = BlockRouter(D_MODEL, len(layer.routed_names(range(n))), top_k=kw.get("top_k"),
                         temperature=kw.get("temperature", 1.0), bias=kw.get("router_bias", False))
    with torch.no_grad():
        for name, p in [*layer.named_parameters(), *router.named_parameters()]:
            if not name.startswith("base."):
                p.normal_(0, 0.3)
    layer.__dict__["shared_router"] = router
    router.active = True
    return layer, router


@pytest.mark.parametrize("method", ROUTED_METHODS)
@pytest.mark.parametrize("top_k", [None, 2])
def test_block_placed_layer_equals_loop_reference_outputs_and_gradients(method, top_k):
    kw = dict(top_k=top_k, temperature=1.5, router_bias=True)
    (fast, fast_router), (slow, slow_router) = _layer_with_block_router(method, **kw), _layer_with_block_router(method, **kw)
    x, h = torch.randn(3, 5, D_IN), torch.randn(3, 5, D_MODEL)  # h: the block's normed input
    xf, xs, hf, hs = (t.clone().requires_grad_() for t in (x, x, h, h))
    fast_router.capture(None, (), hf)
    slow_router.capture(None, (), hs)
    y_fast, y_slow = fast(xf), reference_forward(slow, xs)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(y_fast)
    (y_fast * weights).sum().backward()
    (y_slow * weights).sum().backward()
    for a, b in ((xf, xs), (hf, hs)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert_same_gradients([*fast.named_parameters(), *fast_router.named_parameters()],
                          [*slow.named_parameters(), *slow_router.named_parameters()])
    assert fast_router.weight.grad is not None and fast_router.weight.grad.abs().sum() > 0


def test_block_placed_layer_without_gates_of_this_forward_refuses():
    layer, router = _layer_with_block_router("modula_res")
    with pytest.raises(RuntimeError, match="no gates for this forward"):
        layer(torch.randn(2, 4, D_IN))
    router.capture(None, (), torch.randn(1, 4, D_MODEL))  # gates of another batch shape
    with pytest.raises(RuntimeError, match="input_layernorm"):
        layer(torch.randn(2, 4, D_IN))


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny-llama")


def _injected(tiny, method="modula_res", placement="block", domains=("math", "code"), seed=0, **kw):
    model = inject(copy.deepcopy(tiny[0]), method, list(domains), router_placement=placement, **kw)
    randomise_experts(model, seed=seed, scale=0.2)
    return model.eval()


@pytest.mark.parametrize("method", ROUTED_METHODS)
def test_one_router_per_block_read_by_all_seven_layers(tiny, method):
    model = _injected(tiny, method)
    names = [n for n, _ in model.named_parameters() if "router" in n]
    assert names == ["model.layers.0.router.weight", "model.layers.1.router.weight"]
    n_routed = 3 if method == "modula_flan" else 2
    assert all(r.weight.shape == (n_routed, 64) for r in block_routers(model).values())
    seen = {}
    for path, layer in expert_layers(model).items():
        assert layer.router is None
        layer.register_forward_hook(lambda m, a, o, path=path: seen.__setitem__(path, m.routed_gates(a[0])))
    model(ids(tiny[1]))
    assert len(seen) == 14
    for block in ("model.layers.0.", "model.layers.1."):
        gates = [g for p, g in seen.items() if p.startswith(block)]
        assert all(g is gates[0] for g in gates)  # one computation, shared


@pytest.mark.parametrize("placement", ["layer", "block"])
@pytest.mark.parametrize("method", ROUTED_METHODS)
def test_captured_gates_are_the_gates_each_router_computed(tiny, method, placement):
    """Expert layers read ``W_R x`` in the same matmul as their A matrices and call ``Router.gate``:
    the evaluation's capture must see those gates (a forward hook on the router saw none)."""
    from modula_ray.evaluation.routing import captured_gates, own_expert_hits

    model = _injected(tiny, method, placement)
    set_stage(model, "joint")
    inputs = {}
    watched = routers(model)
    hosts = expert_layers(model) if placement == "layer" else {p.rsplit(".", 1)[0]: r for p, r in watched.items()}
    for path in hosts:  # the tokens each router saw: the layer's input, or the block's normed input
        module = model.get_submodule(path) if placement == "layer" else model.get_submodule(path).input_layernorm
        hook = (lambda m, a, key=path: inputs.__setitem__(key, a[0])) if placement == "layer" else \
            (lambda m, a, o, key=path: inputs.__setitem__(key, o))
        (module.register_forward_pre_hook if placement == "layer" else module.register_forward_hook)(hook)
    with torch.no_grad(), captured_gates(model) as captured:
        model(ids(tiny[1]))
    assert sorted(captured) == sorted(watched) and len(watched) == (14 if placement == "layer" else 2)
    expected_hits = 0
    with torch.no_grad():
        for path, router in watched.items():
            (gates,) = captured[path]  # once per forward
            host = path.rsplit(".", 1)[0]
            expected = torch.softmax(inputs[host] @ router.weight.T, dim=-1)
            torch.testing.assert_close(gates, expected, atol=1e-6, rtol=1e-5)
            expected_hits += int((expected.argmax(dim=-1) == 0).sum())
    hits, pairs = own_expert_hits(captured, 0)
    assert pairs == len(watched) * ids(tiny[1]).numel()
    assert hits == expected_hits  # (router, token) pairs whose largest reference gate is expert 0
    model(ids(tiny[1]))
    assert all(not calls[1:] for calls in captured.values())  # nothing captured after the block


def test_block_gates_equal_a_per_layer_router_on_the_attention_input(tiny):
    """q, k and v read the block's normed input, so their per-layer router with the block router's
    weights gives the same outputs; o/gate/up/down differ (they read other inputs)."""
    block = _injected(tiny, placement="block")
    layer = _injected(tiny, placement="layer")
    with torch.no_grad():
        for path, lay in expert_layers(layer).items():  # same experts, and each router = its block's
            mine = expert_layers(block)[path]
            for name, p in lay.named_parameters():
                if not name.startswith("router."):
                    p.copy_(dict(mine.named_parameters())[name])
            shared = block.get_submodule(path.split(".self_attn")[0].split(".mlp")[0]).router.weight
            if lay.router.weight.shape == shared.shape:  # down_proj reads the MLP's intermediate size
                lay.router.weight.copy_(shared)
    outputs = {}
    for tag, model in (("block", block), ("layer", layer)):
        for path, lay in expert_layers(model).items():
            lay.register_forward_hook(lambda m, a, o, key=(tag, path): outputs.__setitem__(key, o))
        with torch.no_grad():
            model(ids(tiny[1]))
    for path in expert_layers(block):
        same = torch.allclose(outputs["block", path], outputs["layer", path], atol=1e-6)
        first_layer_of_block = path.startswith("model.layers.0.") and path.endswith(("q_proj", "k_proj", "v_proj"))
        if first_layer_of_block:  # later blocks see different inputs once o/mlp differ
            assert same, path
        if path.endswith(("down_proj", "o_proj")):
            assert not same, path


def test_stages_drive_the_block_routers(tiny):
    model = _injected(tiny)
    set_stage(model, "router")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.0.router.weight", "model.layers.1.router.weight"]
    assert set(routers(model)) == {"model.layers.0.router", "model.layers.1.router"}
    full = forward_parameter_count(model)
    set_stage(model, "universal")
    assert not routers(model) and not any(p.requires_grad for n, p in model.named_parameters() if "router" in n)
    assert forward_parameter_count(model) < full
    single = _injected(tiny, domains=("math",))
    set_stage(single, "experts")
    assert not routers(single)
    trainable = [n for n, p in single.named_parameters() if p.requires_grad]
    assert trainable and all(".domain." in n for n in trainable)
    single(ids(tiny[1]))  # the stage-2 forward runs without any gates


def test_block_router_part_round_trips_and_refuses_the_other_placement(tiny, tmp_path):
    source = _injected(tiny)
    save_part(source, "router", tmp_path / "router")
    target = _injected(tiny, seed=1)
    load_part(target, "router", tmp_path / "router")
    for path, r in block_routers(source).items():
        assert torch.equal(r.weight, block_routers(target)[path].weight)
    per_layer = _injected(tiny, placement="layer")
    with pytest.raises(ArtifactError, match="placement is 'block' in the file but 'layer' in the model"):
        load_part(per_layer, "router", tmp_path / "router")


def test_cached_generation_equals_uncached_with_block_routers(tiny):
    model = _injected(tiny)
    prompt = ids(tiny[1])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_stacking_block_placed_models_gives_a_router_over_all_experts(tiny):
    math, code = _injected(tiny, domains=("math",)), _injected(tiny, domains=("code",))  # one universal
    stacked = stack_experts([math, code])
    assert [r.weight.shape[0] for r in block_routers(stacked).values()] == [2, 2]
    assert all(layer.shared_router is stacked.get_submodule(path.split(".self_attn")[0].split(".mlp")[0]).router
               for path, layer in expert_layers(stacked).items())
    stacked(ids(tiny[1]))


@pytest.mark.parametrize("method, kwargs, message", [
    ("modula_res", {"router_placement": "blocks"}, "router_placement: must be one of"),
    ("lora", {"router_placement": "block"}, "method 'lora' has no router"),
])
def test_bad_placement_is_a_value_error(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        wrap_linear(nn.Linear(D_IN, D_OUT), method, N, **kwargs)
