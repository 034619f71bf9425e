"""Which run folders a hot-plug may read, and what a loaded composition is.

A hot-plug (``POST /v1/admin/experts``) names a run folder. It is read only if, once symlinks
and ``..`` are resolved, it is one of the roots the server was started with (its run folders and
``admin_roots``) or lies under one; anything else is refused before the disk is touched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


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
    loaded_at: float = field(default_factory=time.time)


class Composition:
    """What the multiplexed cache holds for one served name. ``current`` is swapped atomically:
    a batch takes it once when it starts, so requests in flight finish on what they started with."""

    def __init__(self, name: str, loaded: Loaded):
        self.name, self.current = name, loaded

    def swap(self, loaded: Loaded) -> Loaded:
        previous, self.current = self.current, loaded
        return previous


def load(source: str, *, is_run: bool) -> Loaded:
    """A run folder through ``load_composition`` (lineage and base checked), or a base model alone."""
    from ..compose import load_composition
    from ..experts import spec_of
    from ..models import load_base

    model, tokenizer = load_composition(source) if is_run else load_base(source)
    experts = spec_of(model).routed_names() if getattr(model, "modula_spec", None) is not None else []
    return Loaded(model, tokenizer, list(experts), source)
