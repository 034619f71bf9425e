"""Install a trial's router into its run folder, in one step.

The install is built in a hard-linked copy of the run beside it (``fileio.staged_copy``): the
trial's router is copied in and checked (hash, keys) like any part, the trial's config written,
``Manifest.install_router`` records the router entry (hyperparameters, metrics, sha256), the layer
settings in ``experts`` and the search's ledger records; then the copy is swapped with the run
folder in one ``renameat2`` exchange. A reader or a new replica sees the old composition or the
new one, never a router that its manifest does not name; a failure leaves the run as it was.

``recover_router`` finishes or undoes an install that a crash cut short under the earlier
protocol (``router.prev``, ``router.new``, ``config.yaml.new`` in the run folder).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..compose import RUN_CONFIG, Manifest, part_sha256
from ..config import dump_config
from ..experts import read_part
from ..fileio import atomic_write_text, staged_copy


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
    recover_router(run_dir)
    with staged_copy(run_dir, "installing-router") as staging:
        router, staged = staging / "router", staging / "router.new"
        shutil.copytree(source, staged)
        read_part(staged)  # a truncated or altered copy fails here, before anything is replaced
        shutil.rmtree(router, ignore_errors=True)  # the copy's links only: the run keeps its router until the swap
        staged.rename(router)
        atomic_write_text(staging / RUN_CONFIG, dump_config(config, command))
        manifest = Manifest.read(staging)
        manifest.moved(staging, run_dir)
        manifest.install_router(router, experts=config.experts, routed=config.method_class.routed_names(list(
            manifest["domains"])), hyperparameters=hyperparameters, metrics=metrics, tuned=tuned, ledger=ledger)
    return Manifest.read(run_dir)
