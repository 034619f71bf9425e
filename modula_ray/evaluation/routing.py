"""The routing table: does the router send math prompts to the math expert?

For each domain of the composition (and the general domain), the mean gate per routed expert
over ``rows`` prompts of a split, averaged over every router and token of each prompt's
forward. A uniform router gives ``1 / n_routed`` everywhere. ``routing_tables`` also gives the
paper's Figure 3 (first, middle and last layer) and the routing accuracy per domain, from the
same forwards.

On the tokens that carry the domain (``domain_tokens``: the prompt body and the response of each
row, after the chat template's shared head), two more measures per domain, from a forward over
prompt and response: per token, the share of tokens whose router-mean gate is largest for the
row's own expert; per sequence, the share of rows whose mean gate over those tokens is. The own
expert is the one the supervised routing loss targets (``route_labels``: flan's general rows
belong to the universal expert).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from ..compose import RUN_CONFIG, Manifest, load_composition
from ..config import PipelineConfig, load_config
from ..data.schema import row_kind
from ..fileio import atomic_write_json

RESULT_FILE = "routing.json"


def format_routing(table: dict[str, dict[str, float]]) -> str:
    """Rows: prompt domain; columns: routed expert; the largest gate of each row is starred."""
    experts = list(next(iter(table.values())))
    lines = [f"{'prompts from':<14}" + "".join(f"{e:>12}" for e in experts)]
    for domain, row in table.items():
        best = max(row, key=row.get)
        lines.append(f"{domain:<14}" + "".join(f"{row[e]:>11.3f}{'*' if e == best else ' '}" for e in experts))
    return "\n".join(lines)


def save_routing(run_dir, table: dict, *, split: str, rows: int, layers: dict | None = None) -> Path:
    """``RUN_DIR/eval/routing.json`` (atomic): the table, and the per-layer result (``routing_tables``)."""
    path = Path(run_dir) / "eval" / RESULT_FILE
    atomic_write_json(path, {"suite": "routing", "split": split, "rows": rows, "table": table, "layers": layers or {}})
    return path


@contextlib.contextmanager
def captured_gates(model):
    """``{router path: [gates [..., n_routed] of each call]}`` of every active router while inside."""
    from ..experts.inject import routers

    captured: dict[str, list] = {}
    hooks = [router.watch(lambda gates, path=path: captured.setdefault(path, []).append(gates))
             for path, router in routers(model).items()]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def own_expert_hits(captured: dict, expert: int) -> tuple[int, int]:
    """``(hits, pairs)``: (router, token) pairs whose largest gate is routed expert ``expert``."""
    winners = torch.cat([g.reshape(-1, g.shape[-1]) for calls in captured.values() for g in calls]).argmax(dim=-1)
    return int((winners == expert).sum()), winners.numel()


def _strictly_largest(gates: torch.Tensor, expert: int) -> torch.Tensor:
    """``gates[..., expert]`` above every other expert's (a tie, e.g. the uniform router, is a miss)."""
    others = torch.cat([gates[..., :expert], gates[..., expert + 1:]], dim=-1)
    return gates[..., expert] > others.max(dim=-1).values


def domain_token_hits(captured: dict, head: int, expert: int) -> tuple[int, int, bool]:
    """``(tokens routed to expert, tokens, sequence routed to expert)`` of one row's forward: the
    router-mean gate per token from position ``head`` on, and its mean over those tokens."""
    gates = torch.stack([calls[-1][0].float() for calls in captured.values()]).mean(dim=0)[head:]
    return (int(_strictly_largest(gates, expert).sum()), gates.shape[0],
            bool(_strictly_largest(gates.mean(dim=0), expert)))


def domain_token_routing(model, tokenizer, rows: list[dict], expert: int, max_length: int, head: int,
                         captured: dict) -> dict:
    """One domain's rows (prompt, response) scored on their domain tokens (from ``head`` on):
    ``token_accuracy``, ``sequence_accuracy`` and ``route_nll`` (mean ``-log P(expert)`` over the
    tokens and routers); ``by_kind``: rows and sequence accuracy per ``kind`` of row (its generator
    or task, when rows carry one). ``captured``: the open ``captured_gates`` of ``model``."""
    from ..data.formatting import encode_example
    from ..experts.inject import supervised_routing_loss

    hits = tokens = sequences = 0
    nll = 0.0
    by_kind: dict[str, list[int]] = {}
    for row in rows:
        captured.clear()
        example = encode_example(tokenizer, row["prompt"], row["response"], max_length, route_label=expert,
                                 head_length=head)
        model(torch.tensor([example.input_ids]), logits_to_keep=1, use_cache=False)
        row_hits, row_tokens, sequence = domain_token_hits(captured, head, expert)
        hits, tokens, sequences = hits + row_hits, tokens + row_tokens, sequences + sequence
        nll += float(supervised_routing_loss(model, torch.tensor([example.route_labels]))) * row_tokens
        by_kind.setdefault(row.get("kind") or "all", []).append(int(sequence))
    return {"rows": len(rows), "token_accuracy": hits / max(tokens, 1),
            "sequence_accuracy": sequences / max(len(rows), 1), "route_nll": nll / max(tokens, 1),
            "by_kind": {kind: {"rows": len(hit), "sequence_accuracy": sum(hit) / len(hit)}
                        for kind, hit in sorted(by_kind.items())}}


def routing_tables(run_dir, *, split: str = "val", rows: int = 8, progress: bool = False, composition=None
                   ) -> tuple[dict[str, dict[str, float]], dict]:
    """``(table, layers)`` from one forward per prompt; ``({}, {})`` for a method with no router.

    ``table``: ``{prompt domain: {routed expert: mean gate}}`` over every router and token, for
    each domain of the composition and the general domain (``data.general_domain`` of the run's
    ``config.yaml``). ``layers``: per domain of the composition, the mean gate per expert at the
    first, middle and last layer (the paper's Figure 3), and the routing accuracy: the share of
    (router, token) pairs whose largest gate is the domain's own expert; and ``domain_tokens``
    (module docstring) for every domain with a target expert. ``composition``: the
    run's ``(model, tokenizer)`` if already loaded. Only the gates are read, so the forward
    computes no logits but the last position's."""
    from tqdm.auto import tqdm

    from ..data.build import read_datasets_json, split_file
    from ..data.formatting import prompt_ids, shared_head_length
    from ..data.schema import read_split
    from ..experts import method_class, routing_weights, spec_of
    from ..experts.inject import routers

    from transformers.utils import logging as hf_logging

    manifest = Manifest.read(run_dir)
    if not manifest["router"]:
        return {}, {}
    hf_logging.disable_progress_bar()  # one "Loading weights" bar helps nobody here
    model, tokenizer = composition or load_composition(run_dir)
    data_dir = manifest["data"]["dir"]
    built = read_datasets_json(data_dir)["domains"]
    names = spec_of(model).routed_names()
    layer_of = {path: int(re.search(r"layers\.(\d+)\.", path).group(1)) for path in routers(model)}
    layers = sorted(set(layer_of.values()))
    picked = {"first": layers[0], "middle": layers[len(layers) // 2], "last": layers[-1]}
    table, by_layer = {}, {}
    data = load_config(PipelineConfig, Path(run_dir) / RUN_CONFIG).data
    domains = [d for d in list(manifest["domains"]) + [data.general_domain] if d in built]
    targets = method_class(manifest["method"]).route_labels(list(manifest["domains"]), domains)
    head, on_tokens = shared_head_length(tokenizer), {}
    with torch.no_grad(), captured_gates(model) as captured:
        for domain in tqdm(domains, desc="routing", unit="domain", disable=not progress):
            table_rows = read_split(split_file(data_dir, domain, split)).select(["prompt", "response", "source", "meta"])
            split_rows = [{**row, "kind": row_kind(row)} for row in table_rows.slice(0, rows).to_pylist()]
            prompts = [row["prompt"] for row in split_rows]
            if domain in targets:
                on_tokens[domain] = {"expert": names[targets[domain]], **domain_token_routing(
                    model, tokenizer, split_rows, targets[domain], data.max_length, head, captured)}
            sums: dict[str, float] = {}
            per_layer = {key: torch.zeros(len(names)) for key in picked}
            hits = total = 0
            for prompt in prompts:
                captured.clear()
                model(torch.tensor([prompt_ids(tokenizer, prompt)]), logits_to_keep=1, use_cache=False)
                for expert, weight in routing_weights(model).items():
                    sums[expert] = sums.get(expert, 0.0) + weight / len(prompts)
                if domain not in names:  # the general domain has no expert of its own
                    continue
                for key, layer in picked.items():
                    gates = [g[0] for path, calls in captured.items() if layer_of[path] == layer for g in calls]
                    per_layer[key] += torch.cat(gates).float().mean(dim=0) / len(prompts)
                row_hits, row_pairs = own_expert_hits(captured, names.index(domain))
                hits, total = hits + row_hits, total + row_pairs
            table[domain] = sums
            if domain in names:
                by_layer[domain] = {"accuracy": hits / total,
                                    **{key: [round(float(v), 4) for v in gates] for key, gates in per_layer.items()}}
    return table, {"experts": names, "layers": picked, "domains": by_layer, "domain_tokens": on_tokens}
