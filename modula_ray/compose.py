"""A composition on disk: ``RUN_DIR/manifest.json`` plus its parts (DESIGN §2).

``Manifest``          the run manifest: create, read (schema checked), record a part, the ledger,
                      the stages, install a router, save (atomic); readers index it like a dict.
``build_model``       base + injected experts + loaded parts, set to a stage.
``load_composition``  the finished mixture of a run folder, ready for generation.
``check_lineage``     every expert was trained over this universal (``Manifest.check_base``: on this base).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .fileio import atomic_write_json, read_json

MANIFEST = "manifest.json"
RUN_CONFIG = "config.yaml"  # the run's PipelineConfig; its first line is the command that wrote it
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("run_id", "method", "base_model", "experts", "domains", "universal", "router", "stages", "ledger")
# The router's layer settings (``ExpertsConfig`` fields) that a tuned router brings with it.
ROUTER_SETTINGS = ("top_k", "temperature", "router_placement")


@dataclass
class PartRef:
    """One saved part of a composition: what it is and where its folder lies."""

    part: str                  # universal | domain | router
    path: str                  # absolute folder
    domain: str | None = None


class Manifest(Mapping):
    """``RUN_DIR/manifest.json``: read-only mapping access (``manifest["domains"]``, in router
    order); every change goes through a method and reaches the disk on ``save``.

    A part's entry holds its folder relative to the run, the sha256 of its tensors (as its
    config.json records it), its metrics and, for a domain, the sha256 of the train split it was
    trained on. ``ledger`` holds one cost record per Ray Train run, each added once (by ``run_name``)."""

    def __init__(self, run_dir, fields: dict):
        self.run_dir, self._fields = Path(run_dir), fields

    @property
    def path(self) -> Path:
        return self.run_dir / MANIFEST

    @classmethod
    def create(cls, run_dir, *, method: str, base_model: dict, experts: dict) -> "Manifest":
        """A new run: ``base_model`` is ``{name, path, sha256}``, ``experts`` the ``ExpertsConfig`` as a dict."""
        return cls(run_dir, {"schema_version": SCHEMA_VERSION, "run_id": uuid.uuid4().hex[:10], "method": method,
                             "base_model": base_model, "target_modules": list(experts["target_modules"]),
                             "experts": experts, "domains": {}, "universal": None, "router": None, "stages": {},
                             "ledger": []})

    @classmethod
    def read(cls, run_dir, raw: bytes | None = None) -> "Manifest":
        """``RUN_DIR/manifest.json`` (or ``raw``, its bytes as the caller already read them: one read
        for a digest and the load); a missing, malformed or foreign file raises ArtifactError naming it."""
        path = Path(run_dir) / MANIFEST
        if raw is None:
            fields = read_json(path)
        else:
            try:
                fields = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as error:
                raise ArtifactError(path, f"not valid JSON ({error})") from None
        if not isinstance(fields, dict):
            raise ArtifactError(path, f"holds a JSON {type(fields).__name__}, not a run manifest object")
        missing = [k for k in REQUIRED_KEYS if k not in fields]
        if missing:
            raise ArtifactError(path, f"missing keys {missing}")
        if fields.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(path, f"schema_version {fields.get('schema_version')!r} is not {SCHEMA_VERSION}")
        return cls(run_dir, fields)

    def save(self) -> None:
        """Atomic; key order kept (``domains`` is router order)."""
        atomic_write_json(self.path, self._fields, sort_keys=False)

    def __getitem__(self, key):
        return self._fields[key]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, method={self._fields.get('method')!r})"

    # ---- what the run was built from

    def record_data(self, data_dir) -> None:
        """The data folder the stages read (its ``datasets.json`` gives size and seed)."""
        from .data.build import read_datasets_json

        built = read_datasets_json(data_dir)
        self._fields["data"] = {"dir": str(data_dir), "size": built["size"], "seed": built["seed"]}

    def moved(self, old_root, new_root) -> None:
        """The run was built in ``old_root`` and now lives at ``new_root`` (a staged add-domain): the
        one absolute path it records, its data folder when inside the run, follows."""
        data_dir, old_root = self._fields.get("data", {}).get("dir"), str(old_root)
        if data_dir and (data_dir == old_root or data_dir.startswith(old_root + os.sep)):
            self._fields["data"]["dir"] = str(new_root) + data_dir[len(old_root):]

    def _train_sha256(self, domain: str) -> str:
        from .data.build import DATASETS_JSON, read_datasets_json

        data_dir = self._fields.get("data", {}).get("dir")
        if not data_dir:
            raise ArtifactError(self.path, f"records no data folder, so domain {domain!r} has no data hash")
        built = read_datasets_json(data_dir)["domains"]
        if domain not in built:
            raise ArtifactError(Path(data_dir) / DATASETS_JSON, f"has no domain {domain!r}; built: {sorted(built)}")
        return built[domain]["splits"]["train"]["sha256"]

    # ---- parts

    def _part_entry(self, folder, metrics: dict) -> dict:
        return {"path": os.path.relpath(folder, self.run_dir), "sha256": part_sha256(folder), "metrics": metrics}

    def record_universal(self, folder, metrics: dict) -> None:
        self._fields["universal"] = self._part_entry(folder, metrics)

    def record_domain(self, domain: str, folder, metrics: dict) -> None:
        """A domain expert; ``folder`` None for a method whose domains are only its data (lora)."""
        entry = self._part_entry(folder, metrics) if folder else {"path": None, "metrics": metrics}
        self._fields["domains"][domain] = {**entry, "data_sha256": self._train_sha256(domain)}

    def record_router(self, folder, *, routed: list[str], hyperparameters: dict, metrics: dict,
                      tuned: dict | None = None) -> None:
        """``routed``: the router's outputs in order; ``tuned``: the Tune search that picked it."""
        self._fields["router"] = {**self._part_entry(folder, metrics), "routed": list(routed),
                                  "hyperparameters": hyperparameters, **({"tuned": tuned} if tuned else {})}

    def order_domains(self, order: list[str]) -> None:
        """Domains of ``order`` first, in that order (the router's), the others after them, sorted."""
        domains = self._fields["domains"]
        first = [d for d in order if d in domains]
        self._fields["domains"] = {d: domains[d] for d in first + sorted(set(domains) - set(first))}

    def parts(self) -> list[PartRef]:
        """Every saved part of the composition, in load order; each must lie inside the run folder."""
        parts = []
        if self["universal"]:
            parts.append(PartRef("universal", self._inside(self["universal"]["path"], "universal.path")))
        for name, entry in self["domains"].items():
            if entry.get("path"):
                parts.append(PartRef("domain", self._inside(entry["path"], f"domains.{name}.path"), name))
        if self["router"]:
            parts.append(PartRef("router", self._inside(self["router"]["path"], "router.path")))
        return parts

    def _inside(self, relative, field: str) -> str:
        """``run_dir / relative`` once resolved (symlinks, ``..``), refused unless it stays in the run folder."""
        root = Path(self.run_dir).resolve()
        if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
            raise ArtifactError(self.path, f"{field} must be a path relative to the run folder, not {relative!r}")
        if root not in (root / relative).resolve().parents:
            raise ArtifactError(self.path, f"{field} {relative!r} leads outside the run folder {root}")
        return str(self.run_dir / relative)

    def check_lineage(self) -> None:
        check_lineage(self.parts())

    def check_base(self) -> str:
        """The base model folder, after checking its fingerprints against the recorded ones: config and
        weights (``sha256``) and, for runs that record it, tokenizer, chat template and generation
        config (``files_sha256``; runs made before it was recorded are checked on weights alone)."""
        from .models import files_fingerprint, fingerprint

        folder = self["base_model"]["path"]
        if not (Path(folder) / "config.json").is_file():
            raise ArtifactError(self.path, f"base model folder {folder} is missing")
        checks = [("sha256", fingerprint, "config and weights"),
                  ("files_sha256", files_fingerprint, "tokenizer, chat template and generation config")]
        for key, digest, what in checks:
            recorded = self["base_model"].get(key)
            if key == "sha256" or recorded is not None:
                actual = digest(folder)
                if actual != recorded:
                    raise ArtifactError(self.path, f"base model {folder}: its {what} hash to {actual[:12]}..., the "
                                                   f"composition was trained on {str(recorded)[:12]}...")
        return folder

    # ---- stages and the cost ledger

    def start_stage(self, key: str, slug: str, *, force: bool) -> str:
        """Mark stage ``key`` as running; returns its Ray Train run name. A stage that finished
        before (or any stage, with ``force``) gets a new attempt number, so a fresh name."""
        state = self._fields["stages"].setdefault(key, {"attempt": 0})
        if force or state.get("done"):
            state["attempt"] += 1
        state["attempt"] = max(state["attempt"], 1)
        state.update(done=False, run_name=f"modula-{self['run_id']}-{slug}-a{state['attempt']}")
        return state["run_name"]

    def finish_stage(self, key: str, event: str, **details) -> None:
        state = self._fields["stages"].setdefault(key, {"attempt": 1})
        state.update(done=True, finished_at=time.time(), event=event, **details)

    def add_ledger(self, records: list[dict]) -> None:
        """Append cost records; one whose ``run_name`` is already in the ledger is not counted twice."""
        known = {r.get("run_name") for r in self._fields["ledger"]}
        self._fields["ledger"] += [r for r in records if r["run_name"] not in known]

    def install_router(self, folder, *, experts, routed: list[str], hyperparameters: dict, metrics: dict,
                       tuned: dict, ledger: list[dict]) -> None:
        """What a tuned router changes, saved at once: its layer settings (``ROUTER_SETTINGS`` of the
        ``ExpertsConfig`` ``experts``), the router entry, the search's ledger records, the router stage."""
        self._fields["experts"] = {**self["experts"], **{k: getattr(experts, k) for k in ROUTER_SETTINGS}}
        self.record_router(folder, routed=routed, hyperparameters=hyperparameters, metrics=metrics, tuned=tuned)
        self.add_ledger(ledger)
        self.finish_stage("router", f"tune:{tuned['search']}", trial=tuned["trial"])
        self.save()


def build_model(base_model: str, method: str, domains: list[str], experts: dict, *, load=(), stage: str = "router",
                dtype: str = "float32", share_base: bool = False):
    """``(model, tokenizer)``: ``experts`` is the run's ``experts:`` mapping (a manifest's or a task's,
    read by ``config.experts_config``); ``load`` lists the ``PartRef``s to load, in order;
    ``share_base``: over the process's one copy of the base weights (``models.load_base``)."""
    import torch

    from .config import experts_config
    from .experts import inject, load_part, set_stage
    from .models import load_base

    model, tokenizer = load_base(base_model, dtype=getattr(torch, dtype), share=share_base)
    inject(model, method, domains, experts_config(method, experts))
    for ref in load:
        load_part(model, ref.part, ref.path, domain=ref.domain)
    set_stage(model, stage)
    return model, tokenizer


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


def load_composition(run_dir, *, dtype: str = "float32", manifest: Manifest | None = None, share_base: bool = False):
    """``(model, tokenizer)`` of a finished run: the full mixture (the method's inference stage),
    in eval mode, after checking the base model's and every expert's lineage. ``manifest``: the
    run's manifest as the caller read it (else read here); ``share_base``: see ``build_model``."""
    from .experts import method_class

    manifest = manifest or Manifest.read(run_dir)
    domains = list(manifest["domains"])
    router = manifest["router"]
    if router and router["routed"] != method_class(manifest["method"]).routed_names(domains):
        raise ArtifactError(manifest.path, f"router was trained for {router['routed']}, the composition "
                                           f"holds {domains}: retrain the router")
    manifest.check_lineage()
    base = manifest.check_base()
    model, tokenizer = build_model(base, manifest["method"], domains, manifest["experts"], load=manifest.parts(),
                                   stage=method_class(manifest["method"]).inference_stage, dtype=dtype,
                                   share_base=share_base)
    return model.eval(), tokenizer
