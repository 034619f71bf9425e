"""Which run folders a hot-plug may read, what a loaded composition is, and how replicas follow.

A hot-plug (``POST /v1/admin/experts``) names a run folder. It is read only if, once symlinks
and ``..`` are resolved, it is one of the roots the server was started with (its run folders and
``admin_roots``) or lies under one; anything else is refused before the disk is touched.

The call reaches one replica. That replica records what it plugged in ``RUN/serve/plugged.json``
(the sha256 of the manifest it loaded); every replica serving the folder compares it with what it
holds at most every ``FOLLOW_EVERY_S`` and, when they differ, loads and swaps in the background.
A plain ``add-domain`` without a hot-plug changes nothing that is served.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

PLUGGED = Path("serve") / "plugged.json"
FOLLOW_EVERY_S = 2.0


class OutsideRootsError(PermissionError):
    """The folder is not under any root the server was started with (HTTP 403)."""


def inside_roots(run_dir: str, roots: list[str]) -> Path:
    path = Path(run_dir).expanduser().resolve()
    for root in map(Path, roots):
        if path == root or root in path.parents:
            return path
    raise OutsideRootsError(f"run_dir {run_dir!r} is not under a folder this server was started with")


@dataclass
class Loaded:
    """One model with its tokenizer; replaced whole by a hot-plug, never changed in place."""
    model: object
    tokenizer: object
    experts: list[str]
    source: str
    manifest_sha256: str = ""               # of the run folder's manifest.json when it was read
    loaded_at: float = field(default_factory=time.time)


class Composition:
    """What the multiplexed cache holds for one served name. ``current`` is swapped atomically:
    a batch takes it once when it starts, so requests in flight finish on what they started with."""

    def __init__(self, name: str, loaded: Loaded):
        self.name, self.current = name, loaded
        self.checked_at, self.reloading = time.monotonic(), False

    def swap(self, loaded: Loaded) -> Loaded:
        previous, self.current = self.current, loaded
        return previous


def load(source: str, *, is_run: bool) -> Loaded:
    """A run folder through ``load_composition`` (lineage and base checked), or a base model alone."""
    from ..compose import load_composition
    from ..experts import spec_of
    from ..models import load_base

    from ..fileio import sha256_file

    digest = sha256_file(Path(source) / "manifest.json") if is_run else ""
    model, tokenizer = load_composition(source) if is_run else load_base(source)
    experts = spec_of(model).routed_names() if getattr(model, "modula_spec", None) is not None else []
    return Loaded(model, tokenizer, list(experts), source, digest)


def record_plug(loaded: Loaded) -> None:
    """Tell the other replicas serving this folder what is now live."""
    from ..fileio import atomic_write_json

    atomic_write_json(Path(loaded.source) / PLUGGED, {"manifest_sha256": loaded.manifest_sha256,
                                                      "plugged_at": time.time(), "experts": loaded.experts})


def plugged_elsewhere(composition: Composition) -> bool:
    """Whether a hot-plug on another replica made this one's composition stale (checked at most
    every ``FOLLOW_EVERY_S``; never while a reload is under way)."""
    now, current = time.monotonic(), composition.current
    if composition.reloading or not current.manifest_sha256 or now - composition.checked_at < FOLLOW_EVERY_S:
        return False
    composition.checked_at = now
    try:
        record = json.loads((Path(current.source) / PLUGGED).read_text())
    except (OSError, ValueError):
        return False
    return record.get("manifest_sha256") not in (None, current.manifest_sha256)
