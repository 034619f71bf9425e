"""The serving form of a composed model (``experts/serving.py``), held to the trained layers."""
import copy

import pytest
import torch

from modula_ray.experts import expert_layers, inject, method_class, set_stage
from modula_ray.experts.serving import ServingLinear, serving_form
from modula_ray.models import tiny_model
from modula_ray.serve.generation import GenerationRequest, generate_batch
from tests.helpers import randomise_experts

DOMAINS = ["math", "code", "medicine"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def finished(tiny, method: str, seed: int = 3):
    """A copy of the tiny model with ``method``'s experts, random, at its inference stage."""
    model = copy.deepcopy(tiny[0])
    inject(model, method, ["all"] if method == "lora" else DOMAINS, universal_rank=4, domain_rank=2)
    randomise_experts(model, seed=seed, scale=0.2)
    set_stage(model, method_class(method).inference_stage)
    return model.eval()


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("method", ["lora", "molora", "modula_flan", "modula_res"])
def test_the_serving_form_gives_the_trained_models_logits_and_greedy_tokens(tiny, method, fold):
    model = finished(tiny, method)
    ids = torch.tensor([tiny[1]("the patient takes 12 + 7 = 19 doses").input_ids] * 2)
    with torch.no_grad():
        expected = model(ids).logits
        prompt = GenerationRequest(ids[0].tolist(), max_tokens=8, routing=method != "lora")
        [trained] = generate_batch(model, tiny[1], [prompt])
        served = serving_form(copy.deepcopy(model), fold=fold)
        torch.testing.assert_close(served(ids).logits, expected, rtol=1e-4, atol=1e-4)
        [ours] = generate_batch(served, tiny[1], [prompt])
    assert ours.token_ids == trained.token_ids
    if method != "lora":  # the routing report reads the same routers
        assert list(ours.routing) == list(trained.routing)
        assert list(ours.routing.values()) == pytest.approx(list(trained.routing.values()), abs=1e-4)
    layers = [m for m in served.modules() if isinstance(m, ServingLinear)]
    assert len(layers) == len(expert_layers(model)) and not expert_layers(served)
    assert not any(p.requires_grad for p in served.parameters())


def test_folding_merges_the_universal_expert_into_w0_where_the_maths_allows(tiny):
    """lora folds to a plain linear; res folds its universal expert and keeps only the domain ranks;
    flan's gated universal expert is not folded (its (g_0 - 1) path would cost the same)."""
    q = "model.layers.0.self_attn.q_proj"
    lora, res, flan = (serving_form(finished(tiny, m), fold=True) for m in ("lora", "modula_res", "modula_flan"))
    assert lora.get_submodule(q).read is None
    res_layer = res.get_submodule(q)
    assert res_layer.widths == [0, 3 * 2, 3] and res_layer.up.shape == (3 * 2, res_layer.weight.shape[0])
    trained = finished(tiny, "modula_res").get_submodule(q)
    assert not torch.equal(res_layer.weight, trained.base.weight)  # W0 + s* B* A*: a new tensor
    assert flan.get_submodule(q).widths == [0, 4 + 3 * 2, 4]


def test_layers_routed_per_block_and_mode_keep_their_trained_form(tiny):
    model = copy.deepcopy(tiny[0])
    inject(model, "modula_res", DOMAINS, universal_rank=4, domain_rank=2, router_placement="block")
    set_stage(model, "router")
    served = serving_form(model.eval())
    assert len(expert_layers(served)) == len(expert_layers(model)) > 0 and served.modula_serving_routers
