"""Install a trial's router into its run folder, atomically, keeping the previous one until done.

1. copy the trial's router to ``RUN_DIR/router.new`` and check it (hash, keys) like any part;
   write the trial's config to ``RUN_DIR/config.yaml.new``;
2. rename ``router`` to ``router.prev``, then ``router.new`` to ``router``;
3. ``Manifest.install_router`` writes ``manifest.json`` (router entry with its hyperparameters,
   metrics and sha256; the layer settings in ``experts``; the search's ledger records): the
   install is committed;
4. rename ``config.yaml.new`` to ``config.yaml``, delete ``router.prev``.

``recover_router`` finishes or undoes an install that a crash cut short: if the manifest already
names the router in place (step 3 happened), it does step 4; otherwise the previous router comes
back and the staged files go.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..compose import RUN_CONFIG, Manifest, part_sha256
from ..config import dump_config
from ..experts import read_part
from ..fileio import atomic_write_text


def _paths(run_dir: Path) -> tuple[Path, Path, Path, Path]:
    """``(router, router.prev, router.new, config.yaml.new)``."""
    return run_dir / "router", run_dir / "router.prev", run_dir / "router.new", run_dir / f"{RUN_CONFIG}.new"


def recover_router(run_dir) -> str | None:
    """Make ``RUN_DIR/router`` and ``config.yaml`` consistent with the manifest after an
    interrupted install: ``"finished"``, ``"undone"``, or None when nothing was interrupted."""
    run_dir = Path(run_dir)
    router, prev, staged, staged_config = _paths(run_dir)
    if staged.exists():
        shutil.rmtree(staged)
    if not prev.exists() and not staged_config.exists():
        return None
    recorded = (Manifest.read(run_dir)["router"] or {}).get("sha256")
    if router.exists() and recorded and part_sha256(router) == recorded:
        if staged_config.exists():
            staged_config.replace(run_dir / RUN_CONFIG)
        shutil.rmtree(prev, ignore_errors=True)
        return "finished"
    staged_config.unlink(missing_ok=True)
    if prev.exists():
        if router.exists():
            shutil.rmtree(router)
        prev.rename(router)
    return "undone"


def install_router(run_dir, source, *, config, hyperparameters: dict, metrics: dict, tuned: dict, ledger: list[dict],
                   command: str) -> Manifest:
    """Put the router part at ``source`` into the run; returns the new manifest."""
    run_dir = Path(run_dir)
    router, prev, staged, staged_config = _paths(run_dir)
    recover_router(run_dir)
    shutil.copytree(source, staged)
    read_part(staged)  # a truncated or altered copy fails here, before anything is replaced
    atomic_write_text(staged_config, dump_config(config, command))
    if router.exists():
        router.rename(prev)
    staged.rename(router)
    manifest = Manifest.read(run_dir)
    manifest.install_router(router, experts=config.experts, routed=config.method_class.routed_names(list(
        manifest["domains"])), hyperparameters=hyperparameters, metrics=metrics, tuned=tuned, ledger=ledger)
    staged_config.replace(run_dir / RUN_CONFIG)
    shutil.rmtree(prev, ignore_errors=True)
    return manifest
