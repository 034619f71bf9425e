"""Install a trial's router into its run folder, atomically, keeping the previous one until done.

1. copy the trial's router to ``RUN_DIR/router.new`` and check it (hash, keys) like any part;
2. rename ``router`` to ``router.prev``, then ``router.new`` to ``router``;
3. write ``manifest.json`` (router entry with its hyperparameters, metrics and sha256; the layer
   settings in ``experts``; the search's ledger records) and ``config.yaml``, each atomically;
4. delete ``router.prev``.

``recover_router`` finishes or undoes an install that a crash cut short: if the manifest already
names the router in place (step 3 happened), ``router.prev`` goes; otherwise it comes back.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..compose import part_sha256, read_manifest, write_manifest
from ..config import dump_config
from ..experts import read_part
from ..fileio import atomic_write_text


def recover_router(run_dir) -> str | None:
    """Make ``RUN_DIR/router`` consistent with the manifest after an interrupted install."""
    run_dir = Path(run_dir)
    router, prev, staged = run_dir / "router", run_dir / "router.prev", run_dir / "router.new"
    if staged.exists():
        shutil.rmtree(staged)
    if not prev.exists():
        return None
    recorded = (read_manifest(run_dir).get("router") or {}).get("sha256")
    if router.exists() and recorded and part_sha256(router) == recorded:
        shutil.rmtree(prev)
        return "finished"
    if router.exists():
        shutil.rmtree(router)
    prev.rename(router)
    return "undone"


def install_router(run_dir, source, *, config, hyperparameters: dict, metrics: dict, tuned: dict, ledger: list[dict],
                   command: str) -> dict:
    """Put the router part at ``source`` into the run; returns the new manifest."""
    run_dir = Path(run_dir)
    router, prev, staged = run_dir / "router", run_dir / "router.prev", run_dir / "router.new"
    recover_router(run_dir)
    shutil.copytree(source, staged)
    read_part(staged)  # a truncated or altered copy fails here, before anything is replaced
    if router.exists():
        router.rename(prev)
    staged.rename(router)
    manifest = read_manifest(run_dir)
    manifest["experts"] = {**manifest["experts"], "top_k": config.experts.top_k,
                           "temperature": config.experts.temperature,
                           "router_placement": config.experts.router_placement}
    manifest["router"] = {"path": "router", "routed": config.method_class.routed_names(list(manifest["domains"])),
                          "hyperparameters": hyperparameters, "metrics": metrics, "sha256": part_sha256(router),
                          "tuned": tuned}
    known = {r.get("run_name") for r in manifest["ledger"]}
    manifest["ledger"] += [r for r in ledger if r["run_name"] not in known]
    stage = manifest["stages"].setdefault("router", {"attempt": 1})
    stage.update(done=True, finished_at=time.time(), event=f"tune:{tuned['search']}", trial=tuned["trial"])
    write_manifest(run_dir, manifest)
    atomic_write_text(run_dir / "config.yaml", dump_config(config, command))
    if prev.exists():
        shutil.rmtree(prev)
    return manifest
