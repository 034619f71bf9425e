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
