"""Multiple-choice accuracy by log-likelihood, item by item: what the experiment bootstraps.

An item is a question with options A-D (the MMLU rows of medicine and finance, and the MMLU
subjects outside every domain, ``tasks.GENERAL_SUBJECTS``: general-capability retention). Training
answers such a row with ``"<letter>. <option>"``, so the model's answer is its first response
token: the item is correct when

    argmax_k log p(first token of "<letter_k>. <option_k>" | chat-templated prompt) = the answer,

the letter-choice scoring of lm-eval's ``mmlu`` task, read from one forward per item (the logits
of the last prompt position only). At 135M a model's prior for one letter decides most answers
(``top_letter_share``), so ``calibrated_accuracy`` also scores each item after every letter's
mean log-probability over the items is taken away. A prompt longer than ``max_length`` loses its start (after the
chat template's shared head), as training cuts it; the options and the instruction stay.

Items never enter training: a domain's test rows, then its validation rows (both held out by
the hash split) up to ``rows``; the general items are the first ``rows / 8`` of each general
subject. Written to ``RUN_DIR/eval/mc.json`` (``DIR/base/mc.json`` for the base model).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..fileio import atomic_write_json

RESULT_FILE = "mc.json"
GENERAL = "general_mmlu"   # the general-capability items' name in mc.json (the data's general domain is not MMLU)
LETTERS = "ABCD"
MAX_LENGTH = 1024          # tokens of context; the longest MMLU question here has 1,060 (its start is cut)


def letter_tokens(tokenizer, prompt: str, choices: list[str], max_length: int) -> tuple[list[int], list[int]]:
    """``(context ids, first response token of each option)`` as training encodes ``"<letter>. <option>"``.
    A context over ``max_length - 1`` tokens loses the tokens right after the template's shared head."""
    from ..data.formatting import IGNORE_INDEX, encode_example, shared_head_length

    context, firsts = None, []
    for letter, option in zip(LETTERS, choices):
        example = encode_example(tokenizer, prompt, f"{letter}. {option}", 1 << 30)  # uncut; cut below
        start = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
        context = context or example.input_ids[:start]
        firsts.append(example.input_ids[start])
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"the options' first response tokens are not distinct ({firsts}): letter scoring cannot "
                         "tell them apart with this tokenizer")
    over = len(context) - (max_length - 1)
    if over > 0:
        head = shared_head_length(tokenizer)
        if len(context) - head <= over:
            raise ValueError(f"max_length {max_length} cannot hold the chat template's head and a question")
        context = context[:head] + context[head + over:]
    return context, firsts


def choice_logprobs(model, tokenizer, items: list[dict], max_length: int, batch_size: int = 8) -> list[list[float]]:
    """``log p`` of each option's first response token for every item (dicts with ``prompt`` and
    ``choices``), in order. Batches of like lengths, right-padded; only the last prompt position
    of each row reaches the output layer."""
    encoded = [letter_tokens(tokenizer, item["prompt"], list(item["choices"]), max_length) for item in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    out: list[list[float]] = [[] for _ in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                context = encoded[i][0]
                ids[row, :len(context)] = torch.tensor(context)
                mask[row, :len(context)] = 1
            last = mask.sum(dim=1) - 1
            keep = torch.unique(last)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            column = torch.searchsorted(keep, last)
            for row, i in enumerate(chunk):
                out[i] = [float(logp[row, column[row], token]) for token in encoded[i][1]]
    return out


def mc_items(data_dir, domain: str, rows: int) -> list[dict]:
    """The first ``rows`` items with options of ``domain``'s test split, then of its validation split;
    ``GENERAL``: the general subjects' MMLU items, ``ceil(rows / subjects)`` of each."""
    from ..data.build import split_file
    from ..data.schema import read_split
    from .tasks import GENERAL_SUBJECTS, load_general

    if domain == GENERAL:
        picked = load_general(per_subject=math.ceil(rows / len(GENERAL_SUBJECTS)))["test"].to_list()
        return [{"id": f"{GENERAL}-{n}", "prompt": r["prompt"], "choices": r["choices"], "answer": r["answer"]}
                for n, r in enumerate(picked)][:rows]
    items = []
    for split in ("test", "val"):
        table = read_split(split_file(data_dir, domain, split)).select(["id", "prompt", "choices", "answer"])
        items += [r for r in table.to_pylist() if r["choices"]]
    return items[:rows]


def has_options(data_dir, domain: str) -> bool:
    """Whether ``domain``'s test rows are multiple-choice questions (rows with options A-D)."""
    from ..data.build import read_datasets_json, split_file
    from ..data.schema import read_split

    if domain not in read_datasets_json(data_dir)["domains"]:
        return False
    first = read_split(split_file(data_dir, domain, "test")).select(["choices"]).slice(0, 1).to_pylist()
    return bool(first and first[0]["choices"] and len(first[0]["choices"]) == len(LETTERS))


def calibrated(logprobs: list[list[float]]) -> list[int]:
    """Each item's option once every letter's mean log-probability over the items is taken away: the
    model's prior for a letter, which at chance-level accuracy decides most answers, cancels
    ("calibrate before use", Zhao et al. 2021); no answer is read."""
    table = torch.tensor(logprobs, dtype=torch.float64)
    return (table - table.mean(dim=0)).argmax(dim=1).tolist()


def mc_accuracy(model, tokenizer, data_dir, domains: list[str], *, rows: int, max_length: int,
                progress: bool = False) -> dict:
    """``{"rows", "max_length", "domains": {domain: {"ids", "answer", "logprobs", "predicted", "correct",
    "accuracy", "calibrated_correct", "calibrated_accuracy", "top_letter_share"}}}`` over the
    multiple-choice domains among ``domains`` (and ``GENERAL`` when named)."""
    from tqdm.auto import tqdm

    picked = [d for d in domains if d == GENERAL or has_options(data_dir, d)]
    out = {"rows": rows, "max_length": max_length, "scoring": "first response token of each option", "domains": {}}
    for domain in tqdm(picked, desc="multiple choice", unit="domain", disable=not progress):
        items = mc_items(data_dir, domain, rows)
        logprobs = choice_logprobs(model, tokenizer, items, max_length)
        answers = [list(item["choices"]).index(item["answer"]) for item in items]
        predicted = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
        correct = [int(p == a) for p, a in zip(predicted, answers)]
        fair = [int(p == a) for p, a in zip(calibrated(logprobs), answers)]
        out["domains"][domain] = {
            "ids": [item["id"] for item in items], "answer": answers,
            "logprobs": [[round(v, 4) for v in lp] for lp in logprobs], "predicted": predicted, "correct": correct,
            "accuracy": sum(correct) / max(1, len(correct)), "calibrated_correct": fair,
            "calibrated_accuracy": sum(fair) / max(1, len(fair)),
            "top_letter_share": max(predicted.count(k) for k in range(len(LETTERS))) / max(1, len(predicted))}
    return out


def run_mc(run_dir, *, rows: int, max_length: int = MAX_LENGTH, domains: list[str] | None = None,
           composition=None) -> dict:
    """A finished run's accuracy on its multiple-choice domains (or ``domains``) and ``GENERAL``."""
    from ..compose import Manifest, load_composition

    manifest = Manifest.read(run_dir)
    model, tokenizer = composition or load_composition(run_dir)
    names = list(domains) if domains is not None else [*manifest["domains"], GENERAL]
    return mc_accuracy(model, tokenizer, manifest["data"]["dir"], names, rows=rows, max_length=max_length)


def save_mc(folder, result: dict) -> Path:
    path = Path(folder) / RESULT_FILE
    atomic_write_json(path, result)
    return path
