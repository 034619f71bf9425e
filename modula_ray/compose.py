"""A composition on disk: ``RUN_DIR/manifest.json`` plus its parts (DESIGN §2).

``build_model``       base + injected experts + loaded parts, set to a stage.
``load_composition``  the finished mixture of a run folder, ready for generation.
``read_manifest`` / ``write_manifest``  atomic JSON with the schema checked on read.
``check_lineage`` / ``check_base``  every expert was trained over this universal, on this base.
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


def part_sha256(folder) -> str:
    """The recorded sha256 of a saved part's tensor file (checked again when the part loads)."""
    config = read_json(Path(folder) / "config.json")
    if not isinstance(config, dict) or not config.get("sha256"):
        raise ArtifactError(Path(folder) / "config.json", "records no sha256: not a saved part")
    return config["sha256"]


def check_lineage(parts: list[PartRef]) -> None:
    """Every domain expert must have been trained over the universal expert it is composed with.

    Stage 2 records ``metadata.universal_sha256`` in each expert's config.json; a mismatch means
    the universal was retrained (or swapped) after the expert, and the mixture would be wrong."""
    universal = next((ref for ref in parts if ref.part == "universal"), None)
    if universal is None:
        return
    current = part_sha256(universal.path)
    for ref in parts:
        if ref.part != "domain":
            continue
        file = Path(ref.path) / "config.json"
        trained_over = (read_json(file).get("metadata") or {}).get("universal_sha256")
        if trained_over != current:
            raise ArtifactError(file, f"expert {ref.domain!r} was trained over the universal expert with sha256 "
                                      f"{str(trained_over)[:12]}..., but {universal.path} has sha256 "
                                      f"{current[:12]}...: retrain the expert over this universal, or restore "
                                      f"the universal it was trained over")


def check_base(run_dir, manifest: dict) -> str:
    """The base model folder, after checking its fingerprint against the manifest's."""
    from .models import fingerprint

    folder = manifest["base_model"]["path"]
    if not (Path(folder) / "config.json").is_file():
        raise ArtifactError(Path(run_dir) / MANIFEST, f"base model folder {folder} is missing")
    actual, recorded = fingerprint(folder), manifest["base_model"]["sha256"]
    if actual != recorded:
        raise ArtifactError(Path(run_dir) / MANIFEST, f"base model {folder} has sha256 {actual[:12]}..., the "
                                                      f"composition was trained on {recorded[:12]}...")
    return folder


def load_composition(run_dir, *, dtype: str = "float32"):
    """``(model, tokenizer)`` of a finished run: the full mixture (the method's inference stage),
    in eval mode, after checking the base model's and every expert's lineage."""
    from .experts import method_class

    manifest = read_manifest(run_dir)
    domains = list(manifest["domains"])
    router = manifest["router"]
    if router and router["routed"] != method_class(manifest["method"]).routed_names(domains):
        raise ArtifactError(Path(run_dir) / MANIFEST, f"router was trained for {router['routed']}, the composition "
                                                      f"holds {domains}: retrain the router")
    parts = composition_parts(run_dir, manifest)
    check_lineage(parts)
    base = check_base(run_dir, manifest)
    model, tokenizer = build_model(base, manifest["method"], domains, manifest["experts"], load=parts,
                                   stage=method_class(manifest["method"]).inference_stage, dtype=dtype)
    return model.eval(), tokenizer
