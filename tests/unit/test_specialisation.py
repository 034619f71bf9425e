"""Each expert alone: ``forced_expert`` held to the layer's own per-expert reference with a one-hot
gate, and the held-out loss per byte held to a plain cross-entropy."""
import pytest
import torch
from torch import nn

from modula_ray.data.formatting import encode_example
from modula_ray.evaluation.heldout import item_losses
from modula_ray.evaluation.specialisation import forced_expert, response_nll_per_byte
from modula_ray.experts import reference_forward
from modula_ray.experts.reference import Terms
from modula_ray.models import tiny_model
from tests.unit.test_layers import D_IN, make_layer


@pytest.mark.parametrize("method, routed", [("molora", 3), ("modula_flan", 4), ("modula_res", 3)])
def test_a_forced_expert_is_the_mixture_with_a_one_hot_gate(method, routed, monkeypatch):
    model = nn.Sequential(make_layer(method))
    model[0].set_stage("router")
    x = torch.randn(2, 5, D_IN)
    mixed = model(x)
    for index in range(routed):
        one_hot = torch.zeros(2, 5, routed)
        one_hot[..., index] = 1.0
        with monkeypatch.context() as patch:
            patch.setattr(Terms, "gates", lambda self, source: one_hot)
            expected = reference_forward(model[0], x)
        with torch.no_grad(), forced_expert(model, index):
            forced = model(x)
            assert torch.equal(model[0].router.mean_gates, torch.eye(routed)[index])
        torch.testing.assert_close(forced, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), mixed)  # the routers are back


def plain_nll(model, tokenizer, row, max_length):
    """-log p(response tokens | prompt) from a full forward of one row, logits at every position."""
    example = encode_example(tokenizer, row["prompt"], row["response"], max_length)
    ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    scored = labels[1:] != -100
    return -float(logp[scored].gather(1, labels[1:][scored][:, None]).sum())


def test_held_out_losses_item_by_item_equal_full_forwards():
    """Logits kept only where a response token is predicted, rows of different lengths batched:
    each item's nll equals its own full forward; a response cut by max_length counts the bytes kept."""
    model, tokenizer = tiny_model()
    rows = [{"prompt": "what is 2 + 2?", "response": "4"},
            {"prompt": "name a fruit and say why it is good to eat every day", "response": "an apple"},
            {"prompt": "count", "response": "one two three four five six seven eight nine ten " * 4}]
    nll, nbytes = item_losses(model, tokenizer, rows, 48, batch_size=3)
    assert nll == pytest.approx([plain_nll(model, tokenizer, row, 48) for row in rows], rel=1e-5)
    assert nbytes[:2] == [1, len(b"an apple")]
    example = encode_example(tokenizer, rows[2]["prompt"], rows[2]["response"], 48)
    assert example.response_cut > 0 and 0 < nbytes[2] < len(rows[2]["response"].encode())


def test_the_held_out_loss_is_nats_per_response_byte():
    model, tokenizer = tiny_model()
    rows = [{"prompt": "what is 2 + 2?", "response": "4"}, {"prompt": "name a fruit", "response": "an apple"}]
    expected = sum(plain_nll(model, tokenizer, row, 512) for row in rows) / len("4an apple".encode())
    assert response_nll_per_byte(model, tokenizer, rows, 512, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert response_nll_per_byte(model, tokenizer, rows, 512, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_stage_two_validation_puts_each_domain_through_its_own_expert(tmp_path, tiny_fresh):
    """``validate_rows`` on the experts stage (``own_expert``): each domain's val loss is the forward with
    every router forced onto that domain's expert, token-weighted over its rows; not the router's mix."""
    from modula_ray.data.build import build_datasets, split_file
    from modula_ray.data.formatting import collate, encode_rows
    from modula_ray.data.schema import read_split
    from modula_ray.evaluation.validation import RouterValidation
    from modula_ray.experts import inject, set_stage
    from modula_ray.objective import causal_lm_loss
    from modula_ray.train.task import StageTask
    from tests.helpers import randomise_experts

    build_datasets("tiny", 0, tmp_path / "data", domains=["math", "code"], progress=False)
    model, tokenizer = tiny_fresh
    inject(model, "modula_res", ["math", "code"])
    randomise_experts(model, scale=0.2)
    set_stage(model, "joint")  # as stage 2 together builds it (train/loop.py)
    task = lambda own: StageTask(key="experts", stage="experts", method="modula_res", domains=["math", "code"],  # noqa: E731
                                 base_model="", experts={}, data_dir=str(tmp_path / "data"),
                                 data_domains=["math", "code"], hparams={}, run_dir=str(tmp_path), max_length=512,
                                 validator_args={"rows": 3, "own_expert": own})
    forced, mixed = RouterValidation(tokenizer, task(True))(model), RouterValidation(tokenizer, task(False))(model)
    for index, domain in enumerate(["math", "code"]):
        rows = read_split(split_file(tmp_path / "data", domain, "val")).slice(0, 3).to_pylist()
        ce = tokens = 0.0
        with torch.no_grad(), forced_expert(model, index):
            for example in encode_rows(rows, tokenizer, 512)[0]:
                _, stats = causal_lm_loss(model, collate([example], tokenizer.pad_token_id))
                ce, tokens = ce + stats["ce"] * stats["tokens"], tokens + stats["tokens"]
        assert forced[f"val_loss/{domain}"] == pytest.approx(ce / tokens, rel=1e-5)
        assert forced[f"val_loss/{domain}"] != pytest.approx(mixed[f"val_loss/{domain}"], rel=1e-4)
    assert "routing_accuracy/math" not in forced and "routing_accuracy/math" in mixed
