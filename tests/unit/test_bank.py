"""One forward for rows of several compositions over one base (``serve/bank.py``), held to each
composition decoding alone."""
import copy

import pytest

from modula_ray.experts import inject, set_stage
from modula_ray.experts.serving import serving_form
from modula_ray.models import tiny_model
from modula_ray.serve.bank import Bank, bank_key
from modula_ray.serve.generation import Decoder, GenerationRequest, generate_batch
from tests.helpers import compositions_over_one_base, randomise_experts

PROMPTS = ["What is 3 + 4?", "the patient takes a dose", "def add(a, b): return", "organic apples aisle",
           "the market price of the product is", "x"]


@pytest.fixture(scope="module")
def served():
    return compositions_over_one_base()


def test_rows_of_three_compositions_and_the_base_share_one_forward_and_decode_as_alone(served):
    base, tokenizer, models = served
    owners = [models[0], models[1], base, models[2], models[0], models[1]]
    requests = [GenerationRequest(tokenizer(p).input_ids, max_tokens=4 + i, routing=True, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    alone = [generate_batch(owner, tokenizer, [request])[0] for owner, request in zip(owners, requests)]
    assert len({bank_key(m) for m in [base, *models]}) == 1
    bank = Bank(base)
    for model in models:
        bank.join(model)
    calls = []
    bank.model.register_forward_hook(lambda *_: calls.append(1))
    decoder, results = Decoder(None, tokenizer, slots=3, bank=bank), {}
    waiting = list(zip(requests, owners))
    while waiting or decoder.running:
        new, waiting = waiting[:3 - decoder.running], waiting[3 - decoder.running:]
        for request, event in decoder.step([r for r, _ in new], [m for _, m in new]):
            results[id(request)] = event.result or results.get(id(request))
    together = [results[id(r)] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    for mine, theirs in zip(together, alone):  # each row routed by its own composition's routers
        assert (mine.routing is None) == (theirs.routing is None)
        if mine.routing:
            assert list(mine.routing) == list(theirs.routing)
            assert list(mine.routing.values()) == pytest.approx(list(theirs.routing.values()), abs=1e-4)
    assert len(calls) < sum(r.completion_tokens for r in together)  # shared forwards, not one per row


def test_what_cannot_share_the_base_forward_keeps_a_forward_of_its_own(served):
    base, tokenizer, _ = served
    folded = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    inject(folded, "modula_res", ["math"], universal_rank=4, domain_rank=2)
    randomise_experts(folded, seed=9, scale=0.3)
    set_stage(folded, "router")
    assert bank_key(copy.deepcopy(folded).eval()) is None  # trained form (no serving form yet)
    assert bank_key(serving_form(folded.eval(), fold=True)) is None  # a W0 of its own
    with pytest.raises(ValueError, match="base weights"):
        other = tiny_model(seed=1)[0]
        inject(other, "lora", ["all"], universal_rank=4)
        Bank(base).join(serving_form(other.eval()))


def _decode_once(bank, owners, tokens, *, united: bool, record: bool = True):
    """The bank model's hidden states for one token per row of ``owners`` (no cache), through a
    ``Union`` per projection or (``united=False``) each member on its own rows."""
    import torch

    bank.route(owners, 1, record=record)
    bank.mixed = united and bank.mixed
    with torch.no_grad():
        return bank.model.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state


def test_a_decode_step_of_mixed_rows_in_one_union_equals_each_member_on_its_own_rows():
    """In float64, so that what is left is the algebra: the union adds exact zeros for other members."""
    import torch

    from modula_ray.serve.union import Union

    torch.set_default_dtype(torch.float64)
    try:
        base, tokenizer, models = compositions_over_one_base()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # a router bias and temperature, folded into the union's read and mask
        router = next(m for m in models[0].modules() if type(m).__name__ == "Router")
        router.bias = torch.nn.Parameter(torch.randn(router.n_routed, dtype=torch.float64) * 0.5)
        router.temperature = 0.7
    bank = Bank(base)
    for model in models:
        bank.join(model)
    owners = [models[1], base, models[0], models[2], models[0], base, models[1]]
    tokens = torch.randint(5, 200, (len(owners), 1), generator=torch.Generator().manual_seed(0))
    per_member = _decode_once(bank, owners, tokens, united=False)
    gates_alone = [r._last[1].clone() for r in models[0].modula_serving_routers[:2]]
    united = _decode_once(bank, owners, tokens, united=True)
    layer = next(iter(bank.layers.values()))
    assert isinstance(layer._united(bank.present), Union)  # the step did run the union
    assert united.dtype == torch.float64 and united.abs().max() > 0.1
    torch.testing.assert_close(united, per_member, rtol=1e-10, atol=1e-10)
    plain = base.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state
    torch.testing.assert_close(united[[1, 5]], plain[[1, 5]], rtol=1e-12, atol=1e-12)  # the base rows: nothing added
    for router, before in zip(models[0].modula_serving_routers[:2], gates_alone):  # its own rows' gates, recorded
        torch.testing.assert_close(router._last[1], before, rtol=1e-10, atol=1e-12)
        assert router._last[1].shape == (2, 1, router.n_routed)


def test_a_top_k_router_keeps_the_members_on_their_own_rows():
    import torch

    from modula_ray.serve.union import unites

    base, _, models = compositions_over_one_base()
    for router in models[0].modula_serving_routers:
        router.top_k = 1
    layer = next(m for m in models[0].modules() if getattr(m, "router", None) is not None)
    assert not unites(layer) and unites(None)
    bank = Bank(base)
    for model in models:
        bank.join(model)
    owners = [models[0], models[1], base, models[0]]
    tokens = torch.randint(5, 200, (len(owners), 1), generator=torch.Generator().manual_seed(1))
    per_member = _decode_once(bank, owners, tokens, united=False)
    torch.testing.assert_close(_decode_once(bank, owners, tokens, united=True), per_member, rtol=0, atol=0)
    assert all(layer._united(bank.present) is None for layer in bank.layers.values() if layer._union[0])
