"""A composition on disk: ``RUN_DIR/manifest.json`` plus its parts (DESIGN §2).

``build_model``       base + injected experts + loaded parts, set to a stage.
``load_composition``  the finished mixture of a run folder, ready for generation.
``read_manifest`` / ``write_manifest``  atomic JSON with the schema checked on read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .fileio import atomic_write_json, read_json

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("method", "base_model", "domains", "universal", "router", "ledger")


@dataclass
class PartRef:
    """One saved part of a composition: what it is and where its folder lies."""

    part: str                  # universal | domain | router
    path: str                  # absolute folder
    domain: str | None = None


def build_model(base_model: str, method: str, domains: list[str], experts: dict, *, load=(), stage: str = "router",
                dtype: str = "float32"):
    """``(model, tokenizer)``: ``experts`` holds target_modules and the layer kwargs; ``load`` lists
    the ``PartRef``s to load, in order."""
    import torch

    from .experts import inject, load_part, set_stage
    from .models import load_base

    model, tokenizer = load_base(base_model, dtype=getattr(torch, dtype))
    layer_kwargs = {k: v for k, v in experts.items() if k != "target_modules"}
    inject(model, method, domains, target_modules=experts["target_modules"], **layer_kwargs)
    for ref in load:
        load_part(model, ref.part, ref.path, domain=ref.domain)
    set_stage(model, stage)
    return model, tokenizer


def read_manifest(run_dir) -> dict:
    path = Path(run_dir) / MANIFEST
    manifest = read_json(path)
    missing = [k for k in REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ArtifactError(path, f"missing keys {missing}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(path, f"schema_version {manifest.get('schema_version')!r} is not {SCHEMA_VERSION}")
    return manifest


def write_manifest(run_dir, manifest: dict) -> None:
    """Key order is kept: ``domains`` is in router order."""
    atomic_write_json(Path(run_dir) / MANIFEST, manifest, sort_keys=False)


def composition_parts(run_dir, manifest: dict) -> list[PartRef]:
    """Every saved part of the composition, in load order."""
    run_dir = Path(run_dir)
    parts = []
    if manifest["universal"]:
        parts.append(PartRef("universal", str(run_dir / manifest["universal"]["path"])))
    for name, entry in manifest["domains"].items():
        if entry.get("path"):
            parts.append(PartRef("domain", str(run_dir / entry["path"]), name))
    if manifest["router"]:
        parts.append(PartRef("router", str(run_dir / manifest["router"]["path"])))
    return parts


def load_composition(run_dir, *, dtype: str = "float32"):
    """``(model, tokenizer)`` of a finished run: the full mixture, in eval mode."""
    manifest = read_manifest(run_dir)
    domains = list(manifest["domains"])
    router = manifest["router"]
    if router and [d for d in router["routed"] if d != "universal"] != domains:
        raise ArtifactError(Path(run_dir) / MANIFEST, f"router was trained for {router['routed']}, the composition "
                                                      f"holds {domains}: retrain the router")
    stage = "universal" if manifest["method"] == "lora" else "router"
    model, tokenizer = build_model(manifest["base_model"]["path"], manifest["method"], domains,
                                   manifest["experts"], load=composition_parts(run_dir, manifest), stage=stage,
                                   dtype=dtype)
    return model.eval(), tokenizer


def routing_by_domain(run_dir, *, split: str = "val", rows: int = 8) -> dict[str, dict[str, float]]:
    """Mean gate per routed expert over ``rows`` prompts of each domain (the composition's
    domains and the general one): does the router send math to the math expert?"""
    import torch

    from .data.build import load_manifest, split_file
    from .data.formatting import prompt_ids
    from .data.schema import read_split
    from .experts import routing_weights

    manifest = read_manifest(run_dir)
    if not manifest["router"]:
        return {}
    model, tokenizer = load_composition(run_dir)
    data_dir = manifest["data"]["dir"]
    domains = [d for d in list(manifest["domains"]) + ["general"] if d in load_manifest(data_dir)["domains"]]
    table = {}
    with torch.no_grad():
        for domain in domains:
            prompts = read_split(split_file(data_dir, domain, split)).column("prompt").to_pylist()[:rows]
            sums: dict[str, float] = {}
            for prompt in prompts:
                model(torch.tensor([prompt_ids(tokenizer, prompt)]))
                for expert, weight in routing_weights(model).items():
                    sums[expert] = sums.get(expert, 0.0) + weight / len(prompts)
            table[domain] = sums
    return table


def format_routing(table: dict[str, dict[str, float]]) -> str:
    experts = list(next(iter(table.values())))
    lines = [f"{'prompts from':<14}" + "".join(f"{e:>11}" for e in experts)]
    lines += [f"{domain:<14}" + "".join(f"{row[e]:>11.3f}" for e in experts) for domain, row in table.items()]
    return "\n".join(lines)
