"""The specialisation matrix: each routed expert alone, the router bypassed, on each domain's
held-out rows.

``forced_expert(model, i)`` makes every router of the composition return the one-hot gate of
routed expert ``i``, so the forward is the mixture with all its weight on that expert (res: the
universal path plus domain expert i; flan: expert i alone). For each domain with test rows and
each expert, the held-out response loss is ``sum -log p(response tokens | chat-formatted prompt)
/ UTF-8 bytes of the responses`` (the end-of-turn token included), next to the mixture's own
(the router at work). A working stage 2 gives each domain its own expert as its row minimum.
Each item's nll is kept (``items``), so the report can put a paired interval on the margin.
Written to ``RUN_DIR/eval/specialisation.json``.
"""
from __future__ import annotations

from pathlib import Path

from ..experts.inject import forced_expert
from ..fileio import atomic_write_json
from .heldout import item_losses

RESULT_FILE = "specialisation.json"


def response_nll_per_byte(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 8) -> float:
    """``sum -log p(response | prompt) / sum UTF-8 bytes of the responses`` over ``rows``."""
    nll, nbytes = item_losses(model, tokenizer, rows, max_length, batch_size)
    return sum(nll) / sum(nbytes)


def specialisation_matrix(run_dir, *, split: str = "test", rows: int = 32, composition=None) -> dict:
    """``{"experts", "domains", "rows", "loss": {domain: {expert: nll/byte}}, "mixture": {domain: nll/byte},
    "own_is_best": {domain: bool}}``; ``{}`` for a composition without a router."""
    from ..compose import RUN_CONFIG, Manifest, load_composition
    from ..config import PipelineConfig, load_config
    from ..data.build import read_datasets_json, split_file
    from ..data.schema import read_split
    from ..experts import method_class, spec_of

    manifest = Manifest.read(run_dir)
    if not manifest["router"]:
        return {}
    model, tokenizer = composition or load_composition(run_dir)
    data = load_config(PipelineConfig, Path(run_dir) / RUN_CONFIG).data
    built = read_datasets_json(manifest["data"]["dir"])["domains"]
    domains = [d for d in list(manifest["domains"]) + [data.general_domain] if d in built]
    names = spec_of(model).routed_names()
    targets = method_class(manifest["method"]).route_labels(list(manifest["domains"]), domains)
    loss, mixture, items = {}, {}, {}
    for domain in domains:
        table = read_split(split_file(manifest["data"]["dir"], domain, split)).select(["id", "prompt", "response"])
        held_out = table.slice(0, rows).to_pylist()
        nll, nbytes = item_losses(model, tokenizer, held_out, data.max_length)
        mixture[domain] = sum(nll) / sum(nbytes)
        items[domain] = {"ids": [r["id"] for r in held_out], "bytes": nbytes, "mixture": _rounded(nll), "nll": {}}
        loss[domain] = {}
        for index, expert in enumerate(names):
            with forced_expert(model, index):
                nll, _ = item_losses(model, tokenizer, held_out, data.max_length)
            loss[domain][expert] = sum(nll) / sum(nbytes)
            items[domain]["nll"][expert] = _rounded(nll)
    own = {d: min(loss[d], key=loss[d].get) == names[targets[d]] for d in domains if d in targets}
    return {"experts": names, "domains": domains, "split": split, "rows": rows, "loss": loss, "mixture": mixture,
            "own_is_best": own, "own_expert": {d: names[targets[d]] for d in domains if d in targets},
            "items": items}


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 5) for v in values]


def format_specialisation(result: dict) -> str:
    """Rows: held-out domain; columns: the expert forced, then the mixture; * marks each row's minimum."""
    experts = result["experts"]
    lines = [f"{'rows from':<14}" + "".join(f"{e:>12}" for e in experts) + f"{'mixture':>12}"]
    for domain, row in result["loss"].items():
        best = min(row, key=row.get)
        lines.append(f"{domain:<14}" + "".join(f"{row[e]:>11.3f}{'*' if e == best else ' '}" for e in experts)
                     + f"{result['mixture'][domain]:>12.3f}")
    return "\n".join(lines)


def save_specialisation(run_dir, result: dict) -> Path:
    path = Path(run_dir) / "eval" / RESULT_FILE
    atomic_write_json(path, result)
    return path
