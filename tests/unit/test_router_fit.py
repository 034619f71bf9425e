"""``route_init_rows``: the routers fitted to the rows' domains before the first step
(experts/router_fit.py): the inputs it captures are the ones each router reads, the fit reaches
the regularised optimum, and it routes rows that 40 Adam steps of the supervised term route."""
import copy

import pytest
import torch
import torch.nn.functional as F

from modula_ray.config import StageConfig
from modula_ray.data.formatting import encode_rows
from modula_ray.errors import ConfigError
from modula_ray.experts import inject, method_class, set_stage
from modula_ray.experts.inject import routers
from modula_ray.experts.router import Router
from modula_ray.experts.router_fit import L2, capture, fit_router, fit_routers, router_inputs, rows_to_fit
from modula_ray.models import tiny_model
from tests.helpers import randomise_experts
from tests.unit.test_routing_loss import ROWS, token_accuracy

DOMAINS = ["math", "code"]


def routed(method: str = "modula_res", **settings):
    """The tiny Llama with random experts at the router stage, its routers random too (so that a
    captured input that is not the router's own would give other logits)."""
    model, tokenizer = tiny_model()
    kw = {"mode_blocks": [[0, 1], [1, 2]]} if method == "mode" else {"universal_rank": 4, "domain_rank": 2}
    inject(model, method, DOMAINS, **kw, **settings)
    randomise_experts(model, seed=3)
    set_stage(model, "router")
    with torch.no_grad():
        for router in routers(model).values():
            router.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    return model, tokenizer


@pytest.mark.parametrize("method, settings", [("modula_res", {}), ("modula_flan", {"router_placement": "block"}),
                                              ("mode", {})])
def test_the_captured_input_is_what_each_router_reads(method, settings):
    model, tokenizer = routed(method, **settings)
    ids = torch.tensor([tokenizer("what is 2 + 3? 5")["input_ids"]])
    with torch.no_grad(), router_inputs(model) as found:
        model(input_ids=ids, use_cache=False)
    paths = routers(model)
    assert sorted(found) == sorted(paths) and paths
    for path, router in paths.items():
        x = found[path]
        expected = (x @ router.weight.T + (router.bias if router.bias is not None else 0)) / router.temperature
        torch.testing.assert_close(router._last[3], expected, rtol=1e-5, atol=1e-5)


def test_one_router_fit_reaches_the_regularised_optimum():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator)
    y = torch.randint(0, 3, (300,), generator=generator)
    x = centres[y] + 0.8 * torch.randn(300, 8, generator=generator)
    router = Router(8, 3, temperature=0.7, bias=True)
    before, after = fit_router(router, x, y)
    assert before == pytest.approx(float(torch.log(torch.tensor(3.0))), rel=1e-6) and after < 0.5 * before
    weight, bias = router.weight.detach().clone().requires_grad_(True), router.bias.detach().clone().requires_grad_(True)
    objective = F.cross_entropy((x @ weight.T + bias) / 0.7, y) + L2 * float(x.norm(dim=-1).mean()) ** 2 * weight.pow(2).sum()
    objective.backward()
    assert float(weight.grad.norm()) < 1e-3 and float(bias.grad.norm()) < 1e-3  # a stationary point (convex: the optimum)
    with torch.no_grad():
        assert float(F.cross_entropy((x @ weight.T + bias) / 0.7, y)) == pytest.approx(after, rel=1e-5)


def test_fitted_routers_route_the_rows_before_any_step():
    model, tokenizer = routed()
    with torch.no_grad():
        for router in routers(model).values():
            router.weight.zero_()
    labels = method_class("modula_res").route_labels(DOMAINS, DOMAINS)
    encoded, _ = encode_rows(ROWS, tokenizer, 512, labels)
    twin = copy.deepcopy(model)
    fit = fit_routers(model, encoded, seed=0)
    assert fit["rows"] == 12 and 12 <= fit["tokens"] <= 12 * 32
    assert fit["input_tokens"] == sum(len(e.input_ids) for e in encoded)
    assert fit["route_nll_before"] == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-5)
    assert fit["route_nll_after"] < 0.3
    from modula_ray.data.formatting import collate

    assert token_accuracy(model, collate(encoded, tokenizer.pad_token_id)) > 0.95  # 40 Adam steps reach this too
    features, y = capture(twin, encoded, seed=0)  # the reference: every router fitted on its own
    for path, router in routers(twin).items():
        fit_router(router, features[path], y)
    for (path, mine), theirs in zip(routers(model).items(), routers(twin).values()):
        assert torch.equal(mine.weight, theirs.weight), path  # q, k, v fitted once; deterministic
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no gradient left behind


def test_route_init_rows_says_what_it_needs():
    model, tokenizer = routed()
    unlabelled, _ = encode_rows(ROWS, tokenizer, 512)
    with pytest.raises(ValueError, match="no training row has a routing label"):
        fit_routers(model, unlabelled, seed=0)
    set_stage(model, "universal")
    labelled, _ = encode_rows(ROWS, tokenizer, 512, {"math": 0, "code": 1})
    with pytest.raises(ValueError, match="trains no router"):
        fit_routers(model, labelled, seed=0)
    with pytest.raises(ConfigError, match="route_init_rows"):
        StageConfig(route_init_rows=-1)
    captured, labels = capture(routed()[0], labelled[:2], seed=0)
    assert all(x.shape == (len(labels), x.shape[-1]) for x in captured.values())


def test_rows_to_fit_takes_every_kind_of_row_in_turn():
    def row(domain, i, generator=None):
        meta = '{"generator": "%s"}' % generator if generator else "{}"
        return {"id": f"{domain}{i}", "domain": domain, "source": f"{domain}-source", "meta": meta}

    code = [row("code", i, "bf") for i in range(12)] + [row("code", 12, "codeio"), row("code", 13, "codeio")]
    math = [row("math", i) for i in range(3)]
    rows = code[:5] + math + code[5:] + [row("general", 0)]
    picked = rows_to_fit(rows, 4, ["code", "math"])
    assert [r["id"] for r in picked] == ["code0", "code12", "code1", "code13", "math0", "math1", "math2"]
    assert [r["id"] for r in rows_to_fit(rows, 1, ["code"])] == ["code0"]
    assert rows_to_fit(rows, 3, ["finance"]) == []  # a domain with no rows gives none
    assert [r["id"] for r in rows_to_fit(code[:3], 2, ["code"])] == ["code0", "code1"]  # one kind: rows in order
