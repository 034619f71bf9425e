"""Fail fast, before any training: can the cluster place every worker group of the plan?

A worker's bundle (``ScalingSpec.worker_resources``) must fit on one node that carries the
group's node labels; the group fits if the eligible nodes can hold ``num_workers`` bundles.
Groups that fit alone but not all at once (stage 2) run partly in sequence: that is a warning.
"""
from __future__ import annotations

import math

from ..errors import ResourceUnavailableError


def _fits(node: dict, need: dict) -> int:
    counts = [math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return min(counts) if counts else 10 ** 6


def _cluster_nodes() -> list[dict]:
    import ray

    return [{"resources": n["Resources"], "labels": n.get("Labels") or {}} for n in ray.nodes() if n["Alive"]]


def check_groups(groups: list[tuple[str, object]], nodes: list[dict] | None = None) -> list[str]:
    """``groups``: ``(name, ScalingSpec)``. Raises ResourceUnavailableError; returns warnings."""
    nodes = _cluster_nodes() if nodes is None else nodes
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node["resources"].items():
            if not name.startswith("node:") and "memory" not in name:
                totals[name] = totals.get(name, 0.0) + amount
    wanted: dict[str, float] = {}
    for name, spec in groups:
        need = spec.worker_resources()
        labels = spec.node_labels or {}
        eligible = [n for n in nodes if all(n["labels"].get(k) == v for k, v in labels.items())]
        capacity = sum(_fits(n["resources"], need) for n in eligible)
        if capacity < spec.num_workers:
            where = f" on nodes labelled {labels}" if labels else ""
            raise ResourceUnavailableError(
                f"{name}: requested {spec.num_workers} worker(s) x {need}{where}, but the cluster can place "
                f"{capacity}; available: {_describe(totals)} over {len(nodes)} node(s)")
        for resource, amount in need.items():
            wanted[resource] = wanted.get(resource, 0.0) + amount * spec.num_workers
    short = {r: a for r, a in wanted.items() if a > totals.get(r, 0.0) + 1e-9}
    if short and len(groups) > 1:
        return [f"the {len(groups)} groups together request {_describe(wanted)}; the cluster has "
                f"{_describe(totals)}, so some will wait for others"]
    return []


def _describe(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
