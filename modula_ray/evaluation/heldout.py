"""Held-out response loss item by item: what the experiment's bootstrap intervals resample.

Each test row is scored as training scores it (``data.formatting.encode_example``: chat template,
the loss on the response and the end-of-turn token, a too-long prompt cut from its start):
``nll_i = sum -log p(response tokens | prompt)`` in nats, and ``bytes_i`` the UTF-8 bytes of
the response text that was scored (all of it unless ``max_length`` cut the response too). A
domain's loss is ``sum_i nll_i / sum_i bytes_i`` (nats per byte, as lm-eval's
``modula_loss_*`` tasks give it), so an interval resamples items and keeps the ratio.

Only the positions that predict a response token go through the output layer
(``logits_to_keep`` as indices): at 128 tokens most of a row is prompt.
Written to ``RUN_DIR/eval/heldout.json`` (and ``DIR/base/heldout.json`` for the base model).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..fileio import atomic_write_json

RESULT_FILE = "heldout.json"


def item_losses(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 8
                ) -> tuple[list[float], list[int]]:
    """``(nll_i, bytes_i)`` of each row (dicts with ``prompt`` and ``response``), in order."""
    from ..data.formatting import IGNORE_INDEX, collate, encode_example

    examples = [encode_example(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # batches of like lengths
    nll = [0.0] * len(examples)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([examples[i] for i in chunk], tokenizer.pad_token_id)
            targets = batch["labels"][:, 1:]
            keep = torch.nonzero((targets != IGNORE_INDEX).any(dim=0)).flatten()  # positions that predict a label
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           logits_to_keep=keep).logits
            picked = targets[:, keep]
            losses = F.cross_entropy(logits.float().transpose(1, 2), picked, ignore_index=IGNORE_INDEX,
                                     reduction="none")
            for i, value in zip(chunk, losses.sum(dim=1)):
                nll[i] = float(value)
    nbytes = []
    for row, example in zip(rows, examples):
        text = row["response"]
        if example.response_cut:
            kept = [t for t in example.labels if t != IGNORE_INDEX]
            text = tokenizer.decode(kept, skip_special_tokens=True)
        nbytes.append(max(1, len(text.encode("utf-8"))))
    return nll, nbytes


def heldout_losses(model, tokenizer, data_dir, domains: list[str], *, rows: int, max_length: int,
                   split: str = "test", progress: bool = False) -> dict:
    """``{"split", "rows", "max_length", "domains": {domain: {"ids", "nll", "bytes", "nll_per_byte"}}}``
    over the first ``rows`` rows of each domain's ``split`` (domains without one are skipped)."""
    from tqdm.auto import tqdm

    from ..data.build import read_datasets_json, split_file
    from ..data.schema import read_split

    built = read_datasets_json(data_dir)["domains"]
    out = {"split": split, "rows": rows, "max_length": max_length, "domains": {}}
    for domain in tqdm([d for d in domains if d in built], desc="held-out loss", unit="domain",
                       disable=not progress):
        table = read_split(split_file(data_dir, domain, split)).select(["id", "prompt", "response"])
        picked = table.slice(0, rows).to_pylist()
        nll, nbytes = item_losses(model, tokenizer, picked, max_length)
        out["domains"][domain] = {"ids": [r["id"] for r in picked], "nll": [round(v, 5) for v in nll],
                                  "bytes": nbytes, "nll_per_byte": sum(nll) / sum(nbytes)}
    return out


def run_heldout(run_dir, *, rows: int, composition=None) -> dict:
    """The held-out losses of a finished run: its composition's domains and the general domain."""
    from ..compose import RUN_CONFIG, Manifest, load_composition
    from ..config import PipelineConfig, load_config

    manifest = Manifest.read(run_dir)
    data = load_config(PipelineConfig, Path(run_dir) / RUN_CONFIG).data
    model, tokenizer = composition or load_composition(run_dir)
    names = [*manifest["domains"], data.general_domain]
    return heldout_losses(model, tokenizer, manifest["data"]["dir"], names, rows=rows, max_length=data.max_length)


def save_heldout(folder, result: dict) -> Path:
    path = Path(folder) / RESULT_FILE
    atomic_write_json(path, result)
    return path
