"""The report's multiple-choice section (Ray-free): accuracy on held-out MMLU items with 95%
bootstrap intervals, and paired differences against the base model and ``compare_to``.

Reads ``DIR/base/mc.json`` and each run's ``eval/mc.json`` (``parts.do_eval``: the old domains
and general MMLU before adding a domain, the added domain after). An item's score is its
correctness averaged over the row's seeds; a domain's accuracy is the mean over its items. The
intervals are ``intervals.Bootstrap``'s with every item weighing 1 (its ``bytes``), so a
difference resamples the same items for both rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import read_json
from .intervals import Bootstrap, Items


def _pool(results: list[dict], key: str = "correct") -> dict[str, Items]:
    """``{"mc/<domain>": Items}``: ``key`` (correct or calibrated_correct) averaged over the seeds,
    which must hold the same items."""
    out = {}
    for domain, first in results[0]["domains"].items():
        runs = [r["domains"][domain] for r in results if domain in r["domains"]]
        if any(run["ids"] != first["ids"] for run in runs):
            raise ValueError(f"multiple-choice items of {domain!r} differ between seeds: evaluate every seed "
                             "with the same eval.mc_rows on the same data")
        out[f"mc/{domain}"] = Items(tuple(first["ids"]), np.mean([np.asarray(r[key], float) for r in runs], 0),
                                    np.ones(len(first["ids"])), len(runs))
    return out


MEASURES = {"correct": "accuracy", "calibrated_correct": "calibrated_accuracy"}  # item key: results.json key


def _rows(exp, out: Path) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """``({label: each seed's mc.json}, {label: {domain: {measure: each seed's value, top_letter_share}}})``."""
    from .parts import run_folder

    runs = {}
    if (out / "base" / "mc.json").is_file():
        runs["base model alone"] = [read_json(out / "base" / "mc.json")]
    for suffix in [""] + ([f"+{exp.add_domain}"] if exp.add_domain else []):
        for method in exp.methods:
            files = [out / run_folder(seed, method, suffix) / "eval" / "mc.json" for seed in exp.seeds]
            results = [read_json(f) for f in files if f.is_file()]
            if results:
                runs[f"{method}{' ' + suffix if suffix else ''}"] = results
    per_seed = {label: {d: {k: [round(r["domains"][d].get(k, float("nan")), 4) for r in results]
                            for k in ("accuracy", "calibrated_accuracy", "top_letter_share")}
                        for d in results[0]["domains"]} for label, results in runs.items()}
    return runs, per_seed


def mc_sections(exp, out: Path) -> tuple[list[str], dict]:
    """The report's lines and ``results.json["multiple_choice"]``; nothing when no run was scored."""
    runs, per_seed = _rows(exp, out)
    if not runs:
        return [], {}
    boot = Bootstrap(exp.eval.bootstrap, seed=1)
    measures = [m for m in MEASURES if all(m in d for r in runs.values() for d in r[0]["domains"].values())]
    pooled = {m: {label: _pool(results, m) for label, results in runs.items()} for m in measures}
    rows = pooled["correct"]
    columns = sorted({key for row in rows.values() for key in row}, key=lambda k: (k.endswith("general_mmlu"), k))
    sizes = {key: len(next(row[key] for row in rows.values() if key in row).ids) for key in columns}
    numbers = {"items": {k[3:]: n for k, n in sizes.items()}, "seed_values": per_seed}
    lines = ["## Multiple-choice accuracy (held-out MMLU items, higher is better)", "",
             "Each option scored by the log-likelihood of its first response token (the letter), one forward per "
             "item; items: " + ", ".join(f"{k[3:]} {n}" for k, n in sizes.items()) + " (a domain's test items, then "
             "its validation items; `general_mmlu`: MMLU subjects outside every domain). The old domains are scored "
             f"before adding {exp.add_domain}, {exp.add_domain} after adding it. A cell is the accuracy over the items "
             "(each item's correctness averaged over the seeds) with its 95% bootstrap interval; chance is 0.25. "
             "*Calibrated*: every letter's mean log-probability over the items taken away first, so a model's "
             "prior for one letter cannot decide its answers; *top letter*: the share of items given the letter "
             "the model picks most (seed by seed).", "",
             "| model | " + " | ".join(f"{k[3:]}: {MEASURES[m].replace('_', ' ')}" for k in columns for m in measures)
             + " | top letter |", "|---" * (len(columns) * len(measures) + 2) + "|"]
    for label in runs:
        cells = [boot.loss(pooled[m][label], [k]).cell() if k in pooled[m][label] else "—"
                 for k in columns for m in measures]
        for m in measures:
            numbers.setdefault(MEASURES[m], {})[label] = {k[3:]: boot.loss(pooled[m][label], [k]).to_dict()
                                                          for k in columns if k in pooled[m][label]}
        top = "; ".join(f"{d} " + ", ".join(f"{v:.2f}" for v in values["top_letter_share"])
                        for d, values in per_seed[label].items())
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {top} |")
    lines += ["", "Paired differences (the same resampled items for both rows; positive is more accurate):", "",
              "| model | against | on | "
              + " | ".join(f"{MEASURES[m].replace('_', ' ')} [95% interval] | verdict" for m in measures)
              + " |", "|---" * (3 + 2 * len(measures)) + "|"]
    base = rows.get("base model alone")
    for label, row in rows.items():
        if row is base:
            continue
        method, _, suffix = label.partition(" ")
        others = [("base model alone", "vs_base")]
        if exp.compare_to and exp.compare_to != method:
            others.append((f"{exp.compare_to}{' ' + suffix if suffix else ''}", "vs_compare"))
        for other, key in others:
            for column in [k for k in columns if other in rows and k in row and k in rows[other]]:
                cells = []
                for m in measures:
                    diff = boot.difference(pooled[m][label], pooled[m][other], [column])
                    verdict = {"lower": "less accurate", "higher": "more accurate"}.get(diff.verdict(), "within noise")
                    numbers.setdefault(key, {}).setdefault(MEASURES[m], {}).setdefault(label, {})[column[3:]] = {
                        "against": other, **diff.to_dict(), "verdict": verdict}
                    cells.append(f"{diff.cell(3, signed=True)} | {verdict}")
                lines.append(f"| {label} | {other} | {column[3:]} | " + " | ".join(cells) + " |")
    return lines + [""], numbers
