"""Multiple-choice accuracy: each option's first-token log-likelihood, batched with the logits of
the last prompt position only, held to a plain full forward of prompt + answer; the items come
from held-out splits only."""
import json

import pytest
import torch

from modula_ray.data.build import build_datasets, split_file
from modula_ray.data.formatting import encode_example, shared_head_length
from modula_ray.data.schema import read_split
from modula_ray.evaluation.multiple_choice import GENERAL, choice_logprobs, mc_accuracy, mc_items
from modula_ray.models import tiny_model

ITEMS = [{"prompt": "Which organ pumps blood?", "choices": ["liver", "heart", "lung", "skin"], "answer": "heart"},
         {"prompt": "A long question about the ledger of a small firm " * 6 + "What is the balance?",
          "choices": ["ten dollars", "twenty", "nothing at all", "a loss"], "answer": "a loss"},
         {"prompt": "2 + 2?", "choices": ["3", "4", "5", "22"], "answer": "4"}]


def plain_logprob(model, tokenizer, prompt, letter, option, max_length):
    """log p(first response token) from a full forward of prompt + "<letter>. <option>" alone, the
    prompt cut right after the template's head to fit ``max_length``."""
    example = encode_example(tokenizer, prompt, f"{letter}. {option}", 10_000)
    start = next(i for i, t in enumerate(example.labels) if t != -100)
    ids = example.input_ids
    over = start - (max_length - 1)
    if over > 0:
        head = shared_head_length(tokenizer)
        ids, start = ids[:head] + ids[head + over:], start - over
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1].float()
    return float(torch.log_softmax(logits, dim=-1)[ids[start]])


@pytest.mark.parametrize("max_length", [256, 40])  # 40 cuts the long prompt from its start
def test_each_option_scores_as_a_full_forward_of_prompt_and_answer(max_length):
    model, tokenizer = tiny_model()
    got = choice_logprobs(model, tokenizer, ITEMS, max_length, batch_size=3)
    for item, row in zip(ITEMS, got):
        expected = [plain_logprob(model, tokenizer, item["prompt"], letter, option, max_length)
                    for letter, option in zip("ABCD", item["choices"])]
        assert row == pytest.approx(expected, abs=1e-4)
    assert len({len(r) for r in got}) == 1 and got[0] != got[2]
    long = encode_example(tokenizer, ITEMS[1]["prompt"], "A. ten dollars", 10_000)
    assert (len(long.input_ids) > max_length) == (max_length == 40)  # the cut is exercised


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    build_datasets("tiny", 0, out, domains=["medicine", "finance", "math"], progress=False)
    return out


def test_items_are_test_then_validation_rows_never_training_rows(tiny_data):
    test, val, train = (read_split(split_file(tiny_data, "medicine", s)).to_pylist() for s in ("test", "val", "train"))
    items = mc_items(tiny_data, "medicine", len(test) + 3)
    assert [i["id"] for i in items] == [r["id"] for r in test] + [r["id"] for r in val[:3]]
    assert not {i["id"] for i in items} & {r["id"] for r in train}
    general = mc_items(tiny_data, GENERAL, 20)
    assert len(general) == 20 and len({i["prompt"] for i in general}) == 20


def test_accuracy_is_the_share_of_items_whose_answer_has_the_largest_logprob(tiny_data):
    model, tokenizer = tiny_model()
    result = mc_accuracy(model, tokenizer, tiny_data, ["math", "medicine", GENERAL], rows=12, max_length=512)
    assert set(result["domains"]) == {"medicine", GENERAL}  # math has no options
    medicine = result["domains"]["medicine"]
    items = mc_items(tiny_data, "medicine", 12)
    logprobs = choice_logprobs(model, tokenizer, items, 512)
    assert medicine["predicted"] == [max(range(4), key=lp.__getitem__) for lp in logprobs]
    assert medicine["answer"] == [i["choices"].index(i["answer"]) for i in items]
    assert medicine["correct"] == [int(p == a) for p, a in zip(medicine["predicted"], medicine["answer"])]
    assert medicine["accuracy"] == pytest.approx(sum(medicine["correct"]) / len(items))


def _mc_file(folder, correct: dict[str, list[int]]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.json").write_text(json.dumps({"domains": {
        d: {"ids": [f"{d}-{i}" for i in range(len(c))], "correct": c, "accuracy": sum(c) / len(c),
            "calibrated_correct": c[::-1], "calibrated_accuracy": sum(c) / len(c), "top_letter_share": 0.5}
        for d, c in correct.items()}}))


def test_the_report_pools_seeds_per_item_and_resolves_a_paired_gain_the_base_does_not_share(tmp_path):
    """120 items: lora right on 90 in both seeds, the base on 60 of those same 90; modula_res's seeds
    disagree on 30 items (0.5 each). Differences are paired, so lora's +0.25 over the base resolves."""
    from modula_ray.experiment.config import EvalSettings, ExperimentConfig
    from modula_ray.experiment.mc_report import mc_sections

    n = 120
    lora = [1] * 90 + [0] * 30
    base = [1] * 60 + [0] * 60
    exp = ExperimentConfig(methods=["lora", "modula_res"], domains=["math", "medicine"], seeds=[0, 1], tune=None,
                           compare_to="lora", add_domain="finance", add_cost_against="lora",
                           eval=EvalSettings(suites=[], heldout_rows=8, bootstrap=500))
    _mc_file(tmp_path / "base", {"medicine": base, "finance": base, GENERAL: base})
    for seed in (0, 1):
        _mc_file(tmp_path / f"seed{seed}" / "lora" / "eval", {"medicine": lora, GENERAL: lora})
        res = [1] * 60 + ([1] * 30 if seed == 0 else [0] * 30) + [0] * 30
        _mc_file(tmp_path / f"seed{seed}" / "modula_res" / "eval", {"medicine": res, GENERAL: lora})
        _mc_file(tmp_path / f"seed{seed}" / "lora+finance" / "eval", {"finance": lora})
    lines, numbers = mc_sections(exp, tmp_path)
    assert numbers["items"] == {"finance": n, "medicine": n, GENERAL: n}
    assert numbers["accuracy"]["lora"]["medicine"]["value"] == pytest.approx(0.75)
    assert numbers["accuracy"]["modula_res"]["medicine"]["value"] == pytest.approx(0.625)  # 60 + 30 x 0.5
    assert numbers["seed_values"]["modula_res"]["medicine"]["accuracy"] == [0.75, 0.5]
    assert numbers["calibrated_accuracy"]["lora"]["medicine"]["value"] == pytest.approx(0.75)
    assert numbers["vs_base"]["calibrated_accuracy"]["lora"]["medicine"]["value"] == pytest.approx(0.25)
    gain = numbers["vs_base"]["accuracy"]["lora"]["medicine"]
    assert gain["value"] == pytest.approx(0.25) and gain["low"] > 0.15 and gain["verdict"] == "more accurate"
    against_lora = numbers["vs_compare"]["accuracy"]["modula_res"]["medicine"]
    assert against_lora["value"] == pytest.approx(-0.125) and against_lora["verdict"] == "less accurate"
    assert numbers["vs_compare"]["accuracy"]["modula_res"][GENERAL]["verdict"] == "within noise"  # identical: 0
    assert numbers["vs_base"]["accuracy"]["lora +finance"]["finance"]["value"] == pytest.approx(0.25)
    assert any(line.startswith("| lora +finance | 0.750 [") for line in lines)


def test_seeds_scored_on_other_items_are_refused(tmp_path):
    from modula_ray.experiment.config import EvalSettings, ExperimentConfig
    from modula_ray.experiment.mc_report import mc_sections

    exp = ExperimentConfig(methods=["lora"], domains=["medicine"], seeds=[0, 1], tune=None, compare_to=None,
                           add_cost_against=None, eval=EvalSettings(suites=[], heldout_rows=8))
    _mc_file(tmp_path / "seed0" / "lora" / "eval", {"medicine": [1, 0]})
    _mc_file(tmp_path / "seed1" / "lora" / "eval", {"medicine": [1, 0, 1]})
    with pytest.raises(ValueError, match="differ between seeds"):
        mc_sections(exp, tmp_path)


def test_calibration_takes_each_letters_prior_away_and_reads_no_answer():
    """A model that always prefers A, but each item's answer a little more than its prior says:
    raw argmax is always A; once each letter's mean log-probability is taken away, the answers win."""
    from modula_ray.evaluation.multiple_choice import calibrated

    prior = [-0.5, -2.0, -2.5, -3.0]
    answers = [0, 1, 2, 3, 1, 2, 3, 0]
    logprobs = [[p + (0.8 if k == a else 0.0) for k, p in enumerate(prior)] for a in answers]
    assert [max(range(4), key=lp.__getitem__) for lp in logprobs] == [0] * len(answers)
    assert calibrated(logprobs) == answers
