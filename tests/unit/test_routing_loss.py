"""The supervised routing term (``route_loss_coef``): its targets, its token labels, its maths
against a plain reference, and that it makes a router route."""
import pytest
import torch
import torch.nn.functional as F

from modula_ray.data.formatting import IGNORE_INDEX, collate, encode_rows, pack, prompt_ids, shared_head_length
from modula_ray.experts import inject, method_class, set_stage
from modula_ray.experts.inject import gate_entropy, routers, supervised_routing_loss
from modula_ray.experts.router import Router
from modula_ray.models import tiny_model
from modula_ray.objective import causal_lm_loss
from tests.helpers import randomise_experts

DATA = ["math", "code", "general"]


@pytest.mark.parametrize("method, expected", [
    ("modula_res", {"math": 0, "code": 1}),                        # general rows: no expert of their own
    ("modula_flan", {"general": 0, "math": 1, "code": 2}),         # general rows: the routed universal
    ("mode", {"general": 0, "math": 1, "code": 2}),                # general rows: the backbone
])
def test_each_row_domain_targets_its_own_routed_expert(method, expected):
    targets = method_class(method).route_labels(["math", "code"], DATA)
    assert targets == expected
    names = method_class(method).routed_names(["math", "code"])
    assert all(names[i] == d for d, i in targets.items() if d in names)


def test_route_labels_cover_the_row_after_the_templates_shared_head():
    _, tokenizer = tiny_model()
    head = shared_head_length(tokenizer)
    first, second = prompt_ids(tokenizer, "what is 2 + 2?"), prompt_ids(tokenizer, "def f(): pass")
    assert 0 < head < min(len(first), len(second)) and first[:head] == second[:head] and first[head] != second[head]
    rows = [{"id": "a", "domain": "math", "prompt": "what is 2 + 2?", "response": "4"},
            {"id": "b", "domain": "general", "prompt": "hello there", "response": "hi"},
            {"id": "c", "domain": "code", "prompt": "def f(): pass", "response": "ok"}]
    encoded, _ = encode_rows(rows, tokenizer, 512, {"math": 0, "code": 1})
    for example, label in zip(encoded, [0, IGNORE_INDEX, 1]):
        assert len(example.route_labels) == len(example.input_ids)
        assert example.route_labels[:head] == [IGNORE_INDEX] * head
        assert example.route_labels[head:] == [label] * (len(example.input_ids) - head)
    packed = pack(encoded, 512)
    assert len(packed) == 1 and packed[0].route_labels == sum((e.route_labels for e in encoded), [])
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["route_labels"].shape == batch["input_ids"].shape
    assert (batch["route_labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert "route_labels" not in collate(encode_rows(rows, tokenizer, 512)[0], tokenizer.pad_token_id)


def test_the_routing_loss_is_the_cross_entropy_of_the_tempered_router():
    torch.manual_seed(0)
    router = Router(8, 3, temperature=0.7)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(2, 5, 8)
    labels = torch.tensor([[0, 1, 2, -100, 1], [-100, -100, 2, 2, 0]])
    router(x)
    logp = F.log_softmax(x @ router.weight.T / 0.7, dim=-1)
    keep = labels != -100
    reference = -logp[keep].gather(1, labels[keep][:, None]).mean()
    assert float(router.routing_loss(labels)) == pytest.approx(float(reference), rel=1e-6)
    uniform = Router(8, 3)
    uniform(x)
    assert float(uniform.routing_loss(labels)) == pytest.approx(float(torch.log(torch.tensor(3.0))), rel=1e-6)
    assert float(uniform.entropy) == pytest.approx(1.0) and float(router.entropy) < 1.0
    with pytest.raises(ValueError, match="routing labels"):
        router.routing_loss(labels[:, :4])


@pytest.fixture
def routed_model():
    """The tiny Llama with random modula_res experts for math and code, at the router stage: the
    experts carry no domain, so the LM loss alone has nothing to route by."""
    model, tokenizer = tiny_model()
    inject(model, "modula_res", ["math", "code"], universal_rank=4, domain_rank=2)
    randomise_experts(model, seed=3)
    with torch.no_grad():
        for router in routers(set_stage(model, "router")).values():
            router.weight.zero_()
    return model, tokenizer


ROWS = [{"id": f"m{i}", "domain": "math", "prompt": f"what is {i} + {2 * i}?", "response": str(3 * i)}
        for i in range(6)] + [{"id": f"c{i}", "domain": "code", "prompt": f"def f{i}(x): return x * {i}",
                               "response": f"f{i}(2) == {2 * i}"} for i in range(6)]


def token_accuracy(model, batch) -> float:
    """Share of labelled tokens whose router-mean gate is largest for the row's own expert."""
    with torch.no_grad():
        causal_lm_loss(model, batch)
        gates = torch.stack([r._last[1] for r in routers(model).values()]).mean(dim=0)
    keep = batch["route_labels"] != IGNORE_INDEX
    return float((gates.argmax(-1)[keep] == batch["route_labels"][keep]).float().mean())


def train_routers(model, batch, route_loss_coef: float, steps: int = 40) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss, stats = causal_lm_loss(model, batch, route_loss_coef=route_loss_coef)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return stats


def test_the_routing_term_trains_only_the_routers_and_makes_them_route(routed_model):
    model, tokenizer = routed_model
    encoded, _ = encode_rows(ROWS, tokenizer, 512, method_class("modula_res").route_labels(["math", "code"], DATA))
    batch = collate(encoded, tokenizer.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.ndim == 2 and p.shape[0] == 2 for p in trainable)  # the routers' W_R alone
    _, stats = causal_lm_loss(model, batch, route_loss_coef=1.0)
    assert stats["route"] == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-5)  # zero init: uniform
    assert stats["entropy"] == pytest.approx(1.0) and gate_entropy(model) == pytest.approx(1.0)
    stats = train_routers(model, batch, 1.0)
    assert stats["route"] < 0.3 and stats["entropy"] < 0.6
    assert token_accuracy(model, batch) > 0.95
    with pytest.raises(ValueError, match="route_labels"):
        causal_lm_loss(model, {k: v for k, v in batch.items() if k != "route_labels"}, route_loss_coef=1.0)


def test_the_lm_loss_alone_does_not_route_experts_that_carry_no_domain(routed_model):
    """The contrast: same model, data and steps, ``route_loss_coef`` 0 (the paper's router)."""
    model, tokenizer = routed_model
    batch = collate(encode_rows(ROWS, tokenizer, 512, {"math": 0, "code": 1})[0], tokenizer.pad_token_id)
    train_routers(model, batch, 0.0)
    with torch.no_grad():
        causal_lm_loss(model, batch)
        assert float(supervised_routing_loss(model, batch["route_labels"])) > 1.0
    assert token_accuracy(model, batch) < 0.7


def test_without_labels_the_loss_is_unchanged(routed_model):
    model, tokenizer = routed_model
    encoded, _ = encode_rows(ROWS, tokenizer, 512, {"math": 0, "code": 1})
    batch = collate(encoded, tokenizer.pad_token_id)
    plain, _ = causal_lm_loss(model, batch)
    with_term, stats = causal_lm_loss(model, batch, route_loss_coef=0.5)
    assert float(with_term - plain) == pytest.approx(0.5 * stats["route"], rel=1e-5)
    assert supervised_routing_loss(model, torch.full_like(batch["route_labels"], IGNORE_INDEX)) == 0


def test_routing_accuracy_on_domain_tokens_counts_a_tie_as_a_miss():
    from modula_ray.evaluation.routing import domain_token_hits

    head = torch.tensor([[0.9, 0.1], [0.9, 0.1]])                  # the shared head: not counted
    body = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.7, 0.3], [0.1, 0.9]])
    captured = {"a.router": [torch.cat([head, body])[None]], "b.router": [torch.cat([head, body])[None]]}
    assert domain_token_hits(captured, 2, 1) == (2, 4, True)      # mean over the body: 0.375 / 0.625
    assert domain_token_hits(captured, 2, 0) == (1, 4, False)
    uniform = {"a.router": [torch.full((1, 6, 2), 0.5)]}
    assert domain_token_hits(uniform, 2, 0) == (0, 4, False)      # ties: no expert is chosen
