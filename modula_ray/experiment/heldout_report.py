"""The report's held-out sections (Ray-free): response loss with 95% bootstrap intervals, each
row against the base model and against ``compare_to``, interference when a domain is added, and
the specialisation matrix (each routed expert alone, the router bypassed).

Reads ``DIR/base/heldout.json`` and each run's ``eval/heldout.json`` and
``eval/specialisation.json`` (``parts.do_eval``); the intervals are ``intervals.Bootstrap``'s.
"""
from __future__ import annotations

from pathlib import Path

from ..fileio import read_json
import numpy as np

from .intervals import Bootstrap, Interval, Items, pool_seeds, seed_losses


def _runs(exp, out: Path) -> dict[str, dict]:
    """``{label: {"kind", "method", "heldout": {seed: dict}, "specialisation": {seed: dict}}}``."""
    from .parts import run_folder

    variants = [("", "trained")] + ([(f"+{exp.add_domain}", "added")] if exp.add_domain else [])
    rows = {}
    for suffix, kind in variants:
        for method in exp.methods:
            row = {"kind": kind, "method": method, "heldout": {}, "specialisation": {}}
            for seed in exp.seeds:
                folder = out / run_folder(seed, method, suffix) / "eval"
                for name in ("heldout", "specialisation"):
                    if (folder / f"{name}.json").is_file():
                        row[name][seed] = read_json(folder / f"{name}.json")
            rows[f"{method}{' ' + suffix if suffix else ''}"] = row
    return rows


def heldout_sections(exp, out: Path) -> tuple[list[str], dict]:
    """The report's lines and ``results.json["heldout"]``; nothing when no held-out loss was evaluated."""
    runs = _runs(exp, out)
    base_file = out / "base" / "heldout.json"
    base = pool_seeds([read_json(base_file)]) if base_file.is_file() else None
    pooled = {label: pool_seeds(list(row["heldout"].values())) for label, row in runs.items() if row["heldout"]}
    lines, numbers = [], {}
    if pooled or base:
        lines, numbers = _loss_lines(exp, runs, pooled, base)
    special_lines, numbers["specialisation"] = _specialisation_lines(runs, Bootstrap(exp.eval.bootstrap))
    return lines + special_lines, numbers


def _loss_lines(exp, runs: dict, pooled: dict, base) -> tuple[list[str], dict]:
    boot = Bootstrap(exp.eval.bootstrap)
    every = [*exp.domains, *([exp.add_domain] if exp.add_domain else [])]
    present = set().union(*(set(row) for row in [*pooled.values(), *([base] if base else [])]))
    columns = [d for d in every if d in present] + sorted(present - set(every))
    old = [d for d in exp.domains if d in present]
    table = {"base model alone": base, **pooled} if base else dict(pooled)
    seeds = sorted({s for row in runs.values() for s in row["heldout"]})
    items = next(iter(next(iter(table.values())).values())).ids
    numbers = {"items_per_domain": len(items), "resamples": exp.eval.bootstrap, "seeds": seeds, "loss": {},
               "seed_values": {}, "vs_base": {}, "vs_compare": {}, "interference": {}}
    lines = ["## Held-out response loss (nats per byte, lower is better)", "",
             f"The first {len(items)} test items of every domain, the same items for every model, scored as "
             "training scores them. A cell is the loss over the items (each item's nll averaged over the seeds "
             f"{seeds}) with its 95% bootstrap interval over the items ({exp.eval.bootstrap} resamples). `old` is "
             f"the mean over {', '.join(old)}. The intervals cover the choice of test items, not training noise: "
             "`old, seed by seed` gives each seed's own value.", "",
             "| model | " + " | ".join(columns) + " | old | old, seed by seed |", "|---" * (len(columns) + 3) + "|"]
    for label, row in table.items():
        cells = [boot.loss(row, [d]).cell() if d in row else "—" for d in columns]
        mean = boot.loss(row, old) if all(d in row for d in old) else None
        numbers["loss"][label] = {d: boot.loss(row, [d]).to_dict() for d in columns if d in row}
        if mean:
            numbers["loss"][label]["old"] = mean.to_dict()
        per_seed = seed_losses(list(runs[label]["heldout"].values()), old) if label in runs else []
        numbers["seed_values"][label] = [round(v, 4) for v in per_seed]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean.cell() if mean else '—'} | "
                     + (", ".join(f"{v:.3f}" for v in per_seed) or "—") + " |")
    lines += ["", "## Differences the intervals resolve", "",
              "Paired: both rows on the same resampled items. Negative is lower loss. A difference whose interval "
              "holds 0 is within noise.", "", "| model | against | on | difference [95% interval] | verdict |",
              "|---|---|---|---|---|"]
    compare = exp.compare_to
    for label, row in pooled.items():
        kind = runs[label]["kind"]
        scopes = [("old", old)] + ([(exp.add_domain, [exp.add_domain])] if kind == "added" else [])
        others = [("base model alone", base)] if base else []
        if compare and compare != runs[label]["method"]:
            other = compare if kind == "trained" else f"{compare} +{exp.add_domain}"
            others.append((other, pooled.get(other)))
        for other_label, other in others:
            for scope, domains in scopes:
                if other is None or not all(d in row and d in other for d in domains):
                    continue
                diff = boot.difference(row, other, domains)
                key = "vs_base" if other is base else "vs_compare"
                numbers[key].setdefault(label, {})[scope] = {"against": other_label, **diff.to_dict(),
                                                             "verdict": diff.verdict()}
                lines.append(f"| {label} | {other_label} | {scope} | {diff.cell(4, signed=True)} | {diff.verdict()} |")
    if exp.add_domain:
        lines += _interference_lines(exp, runs, pooled, old, boot, numbers)
    return lines + [""], numbers


def _interference_lines(exp, runs, pooled, old, boot: Bootstrap, numbers: dict) -> list[str]:
    """The old domains' loss before -> after adding a domain, paired on the same items."""
    lines = ["", f"## Interference: the old domains before → after adding {exp.add_domain}", "",
             "lora and molora retrain from scratch on every domain; the MoDULA variants and mode keep their experts "
             "and retrain only the router or gates, so their old domains move only through routing.", "",
             "| model | old before | old after | after − before [95% interval] | verdict |", "|---|---|---|---|---|"]
    for method in exp.methods:
        before, after = pooled.get(method), pooled.get(f"{method} +{exp.add_domain}")
        if not before or not after or not all(d in before and d in after for d in old):
            continue
        diff: Interval = boot.difference(after, before, old)
        was, now = boot.loss(before, old).value, boot.loss(after, old).value
        numbers["interference"][method] = {"before": was, "after": now, **diff.to_dict(), "verdict": diff.verdict()}
        lines.append(f"| {method} | {was:.3f} | {now:.3f} | {diff.cell(4, signed=True)} | {diff.verdict()} |")
    return lines


def _specialisation_lines(runs: dict, boot: Bootstrap) -> tuple[list[str], dict]:
    """Each routed expert forced alone on each domain's items, averaged over seeds; ``*`` marks a row's minimum.
    The margin of a domain is its own expert's loss minus the best other expert's, paired on the items."""
    lines, numbers = [], {}
    for label, row in runs.items():
        results = [r for r in row["specialisation"].values() if r]
        if not results:
            continue
        experts, domains = results[0]["experts"], results[0]["domains"]
        mean = {d: {e: sum(r["loss"][d][e] for r in results) / len(results) for e in experts} for d in domains}
        own = {seed: sum(r["own_is_best"].values()) for seed, r in row["specialisation"].items() if r}
        scored = len(results[0]["own_is_best"])
        margins = _margins(results, mean, boot)
        numbers[label] = {"experts": experts, "loss": mean, "own_is_best_by_seed": own, "domains_with_expert": scored,
                          "rows": results[0]["rows"], "margin": margins}
        if not lines:
            lines = ["## Specialisation: each routed expert alone (router bypassed)", "",
                     f"Held-out loss (nats per byte) on the first {results[0]['rows']} test items of each domain "
                     "(rows) with all of every router's weight on one expert (columns), the mean over seeds; * marks "
                     "each row's minimum. A working stage 2 puts each domain's minimum on its own expert. The margin "
                     "is the own expert's loss minus the best other expert's, with its paired 95% bootstrap interval "
                     "over the items: negative and resolved means the own expert is the row minimum beyond noise.", ""]
        lines += [f"**{label}**: own expert best for " + ", ".join(f"{n} of {scored} (seed {s})" for s, n in own.items()),
                  "", "| items from | " + " | ".join(experts) + " | margin [95% interval] | verdict |",
                  "|---" * (len(experts) + 3) + "|"]
        for domain, losses in mean.items():
            best = min(losses, key=losses.get)
            margin = margins.get(domain)
            tail = (f" | {margin['against']}: {Interval(margin['value'], margin['low'], margin['high']).cell(3, True)}"
                    f" | {margin['verdict']} |") if margin else " | — | — |"
            lines.append(f"| {domain} | " + " | ".join(f"{v:.3f}{'*' if e == best else ''}" for e, v in losses.items())
                         + tail)
        lines.append("")
    return lines, numbers


def _margins(results: list[dict], mean: dict, boot: Bootstrap) -> dict:
    """``{domain: {"against", "value", "low", "high", "verdict"}}`` where every seed kept its items."""
    if not all("items" in r and "own_expert" in r for r in results):
        return {}
    out = {}
    for domain, own in results[0]["own_expert"].items():
        ids = results[0]["items"][domain]["ids"]
        if any(r["items"][domain]["ids"] != ids for r in results):
            raise ValueError(f"specialisation items of {domain!r} differ between seeds")
        other = min((e for e in mean[domain] if e != own), key=mean[domain].get)

        def pooled(expert: str) -> dict[str, Items]:
            nll = np.mean([np.asarray(r["items"][domain]["nll"][expert], float) for r in results], axis=0)
            return {f"specialisation/{domain}": Items(tuple(ids), nll,
                                                      np.asarray(results[0]["items"][domain]["bytes"], float),
                                                      len(results))}

        diff = boot.difference(pooled(own), pooled(other), [f"specialisation/{domain}"])
        out[domain] = {"own": own, "against": other, **diff.to_dict(), "verdict": diff.verdict()}
    return out
