"""95% bootstrap intervals of held-out response loss (Ray-free).

Every model is scored on the same test items (``evaluation.heldout``). For a row of the report,
each item's nll is first averaged over the row's seeds; a domain's loss is then
``L = sum_i nll_i / sum_i bytes_i`` and a set of domains counts each domain once (the mean of
their ``L``). The interval resamples the items of each domain with replacement (``resamples``
times, the percentile 2.5-97.5 interval). A difference between two rows resamples the *same*
items for both (paired), so the item-to-item spread, which is far larger than any method's
effect, cancels. One set of resampled indices per domain serves every row and comparison.

The interval covers the test items; with few seeds it does not cover training noise, so the
report also gives each seed's own value. A difference is called real only when its interval
excludes 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Items:
    """One domain's held-out items of one row: nll averaged over ``seeds`` runs."""

    ids: tuple
    nll: np.ndarray
    bytes: np.ndarray
    seeds: int


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def verdict(self) -> str:
        """For a difference a - b of losses: lower (better), higher (worse) or within noise."""
        return "lower" if self.high < 0 else "higher" if self.low > 0 else "within noise"

    def cell(self, digits: int = 3, signed: bool = False) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.value)} [{f.format(self.low)}, {f.format(self.high)}]"

    def to_dict(self) -> dict:
        return {"value": round(self.value, 5), "low": round(self.low, 5), "high": round(self.high, 5)}


def pool_seeds(heldouts: list[dict]) -> dict[str, Items]:
    """``{domain: Items}`` from the ``heldout.json`` of each seed; the seeds must hold the same items."""
    out: dict[str, Items] = {}
    if not heldouts:
        return out
    for domain, first in heldouts[0]["domains"].items():
        runs = [h["domains"][domain] for h in heldouts if domain in h["domains"]]
        for run in runs:
            if run["ids"] != first["ids"] or run["bytes"] != first["bytes"]:
                raise ValueError(f"held-out items of {domain!r} differ between seeds: evaluate every seed with "
                                 "the same eval.heldout_rows on the same data")
        out[domain] = Items(tuple(first["ids"]), np.mean([np.asarray(r["nll"], float) for r in runs], axis=0),
                            np.asarray(first["bytes"], float), len(runs))
    return out


def seed_losses(heldouts: list[dict], domains: list[str]) -> list[float]:
    """Each seed's own mean over ``domains`` of ``sum nll / sum bytes`` (the spread intervals omit)."""
    return [float(np.mean([sum(h["domains"][d]["nll"]) / sum(h["domains"][d]["bytes"]) for d in domains]))
            for h in heldouts if all(d in h["domains"] for d in domains)]


class Bootstrap:
    def __init__(self, resamples: int = 2000, seed: int = 0):
        self.resamples, self.rng, self.indices = resamples, np.random.default_rng(seed), {}

    def _indices(self, domain: str, n: int) -> np.ndarray:
        key = (domain, n)
        if key not in self.indices:
            self.indices[key] = self.rng.integers(0, n, size=(self.resamples, n))
        return self.indices[key]

    def _summarise(self, point: float, samples: np.ndarray) -> Interval:
        low, high = np.percentile(samples, [2.5, 97.5])
        return Interval(float(point), float(low), float(high))

    def loss(self, row: dict[str, Items], domains: list[str]) -> Interval:
        """The mean over ``domains`` of each domain's nats per byte."""
        point = np.mean([row[d].nll.sum() / row[d].bytes.sum() for d in domains])
        samples = np.mean([self._ratio(row[d], d) for d in domains], axis=0)
        return self._summarise(point, samples)

    def difference(self, a: dict[str, Items], b: dict[str, Items], domains: list[str]) -> Interval:
        """``loss(a) - loss(b)`` over ``domains``, the same resampled items for both."""
        for d in domains:
            if a[d].ids != b[d].ids:
                raise ValueError(f"the rows hold different {d!r} items: a paired interval needs the same ones")
        point = np.mean([(a[d].nll.sum() - b[d].nll.sum()) / a[d].bytes.sum() for d in domains])
        samples = np.mean([self._ratio(a[d], d) - self._ratio(b[d], d) for d in domains], axis=0)
        return self._summarise(point, samples)

    def _ratio(self, items: Items, domain: str) -> np.ndarray:
        idx = self._indices(domain, len(items.ids))
        return items.nll[idx].sum(axis=1) / items.bytes[idx].sum(axis=1)
