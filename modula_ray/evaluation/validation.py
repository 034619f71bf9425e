"""Router validation on held-out rows: what ``modula-ray tune router`` reports and optimises.

``RouterValidation(tokenizer, task)`` encodes, once, the first ``rows`` rows of ``split`` (val by
default) of every domain the router's data mixes, exactly as training encodes them (chat
template, loss on the response). Called with the model, one forward per row, it returns:

``val_loss``                    mean over domains of the response-token cross-entropy; each domain
                                counts once, whatever its row lengths (``val_loss/<domain>``)
``routing_accuracy``            per domain with an expert, the share of (router, token) pairs whose
                                largest gate is that domain's expert, over every token of its rows
                                (``routing_accuracy/<domain>``, as ``modula-ray eval --suite
                                routing`` reports it); then the mean over those domains
``load_balance``                the routers' Switch load-balance loss (``n sum_i f_i P_i``, 1 =
                                balanced), averaged over the forwards

With ``own_expert`` (stage 2's validation curves, ``stages.experts.validate_rows``), each
domain's rows go through its own expert alone (``forced_expert``), and only ``val_loss`` counts.

The training loop builds it from ``StageTask.validator`` (this module does not import Ray).
"""
from __future__ import annotations

import contextlib

import torch

from ..experts.inject import forced_expert
from .routing import captured_gates, own_expert_hits

METRICS = {"val_loss": "min", "routing_accuracy": "max", "load_balance": "min"}


class RouterValidation:
    def __init__(self, tokenizer, task):
        """``task``: a ``StageTask`` (data_dir, data_domains, max_length; ``validator_args``: split, rows)."""
        from ..data.build import split_file
        from ..data.formatting import encode_rows
        from ..data.schema import read_split

        split, rows = task.validator_args.get("split", "val"), task.validator_args.get("rows", 8)
        self.own_expert = bool(task.validator_args.get("own_expert"))
        self.pad_id = tokenizer.pad_token_id
        self.examples = {}
        for domain in task.data_domains:
            table = read_split(split_file(task.data_dir, domain, split))
            encoded, _ = encode_rows(table.slice(0, rows).to_pylist(), tokenizer, task.max_length)
            if encoded:
                self.examples[domain] = encoded
        if not self.examples:
            raise ValueError(f"validation: no {split} row of {task.data_domains} has a response token within "
                             f"max_length={task.max_length}")

    def __call__(self, model) -> dict[str, float]:
        from ..data.formatting import collate
        from ..experts import load_balancing_loss, spec_of
        from ..objective import causal_lm_loss

        names = spec_of(model).routed_names()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out, balance = {}, []
        try:
            with torch.no_grad(), captured_gates(model) as gates:
                for domain, examples in self.examples.items():
                    ce_sum = tokens = hits = pairs = 0
                    forced = self.own_expert and domain in names
                    for example in examples:
                        gates.clear()
                        batch = {k: v.to(device) for k, v in collate([example], self.pad_id).items()}
                        with forced_expert(model, names.index(domain)) if forced else contextlib.nullcontext():
                            _, stats = causal_lm_loss(model, batch)
                        ce_sum, tokens = ce_sum + stats["ce"] * stats["tokens"], tokens + stats["tokens"]
                        if forced:
                            continue
                        if gates:
                            balance.append(float(load_balancing_loss(model)))
                        if domain in names and gates:
                            row_hits, row_pairs = own_expert_hits(gates, names.index(domain))
                            hits, pairs = hits + row_hits, pairs + row_pairs
                    out[f"val_loss/{domain}"] = ce_sum / max(tokens, 1)
                    if pairs:
                        out[f"routing_accuracy/{domain}"] = hits / pairs
        finally:
            model.train(was_training)
        losses = [v for k, v in out.items() if k.startswith("val_loss/")]
        accuracies = [v for k, v in out.items() if k.startswith("routing_accuracy/")]
        out["val_loss"] = sum(losses) / len(losses)
        out["routing_accuracy"] = sum(accuracies) / len(accuracies) if accuracies else float("nan")
        out["load_balance"] = sum(balance) / len(balance) if balance else float("nan")
        return out
