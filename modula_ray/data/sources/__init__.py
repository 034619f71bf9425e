"""Domain sources, one small registered class per file; adding a domain is adding a file here.

A source yields candidate rows; the builder (``data/build.py``) deduplicates them, puts each in
a split by a hash of its split key, and stops when every split's quota is full. Rows a source
keeps for evaluation only (``held_out``) go to the test split and never to training.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from ...registry import Registry
from ..schema import normalise_prompt, stable_hash


@dataclass(frozen=True)
class Quota:
    train: int
    val: int
    test: int

    def __getitem__(self, split: str) -> int:
        return getattr(self, split)


SIZES = {"tiny": Quota(32, 8, 8), "demo": Quota(192, 24, 24), "full": Quota(4000, 400, 400)}


def make_row(domain: str, source: str, prompt: str, response: str, *, choices=None, answer=None,
             meta: dict | None = None, split_key: str | None = None) -> dict:
    """A schema row; ``id`` is a hash of source and normalised prompt, so duplicates share it."""
    row = {"id": f"{domain}-{stable_hash(source + chr(10) + normalise_prompt(prompt))[:16]}", "domain": domain,
           "source": source, "prompt": prompt, "response": response,
           "choices": list(choices) if choices is not None else None,
           "answer": answer, "meta": json.dumps(meta or {}, sort_keys=True, default=str)}
    row["split_key"] = split_key or prompt
    return row


def derive_seed(*parts) -> int:
    return int(stable_hash(":".join(map(str, parts)))[:8], 16)


class Source:
    """Subclass per domain: set ``domain`` and write ``candidates``; optionally ``held_out``."""

    domain: ClassVar[str]
    description: ClassVar[str] = ""

    def candidates(self, seed: int, quota: Quota) -> Iterable[dict]:
        raise NotImplementedError

    def held_out(self, seed: int, quota: Quota) -> list[dict]:
        """Evaluation-only rows (test split only). Default: none."""
        return []


SOURCES = Registry("domain", "domain")
register_source = SOURCES.register


def get_source(domain: str) -> Source:
    return SOURCES.get(domain)()


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
