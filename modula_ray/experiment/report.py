"""``DIR/report.md``, ``DIR/results.json`` and the PNGs of a paper experiment (Ray-free).

Tables in the style of the paper: domain tasks with Avg. (Table 1), general retention
(Table 3), after adding a domain (Table 4), judged e-commerce generation (Table 5); the cost
from each run's ledger, with the add-domain cost as a fraction of a molora retrain (the paper:
19.8% for Flan, 37.3% for Res, in trainable params x tokens); the routing figure (Figure 3).

Every number is the mean ± std over seeds. A difference is called real only when it is larger
than twice its noise: ``2 sqrt(se_a^2 + se_b^2)`` with ``se`` the larger of the seeds'
standard error (``std / sqrt(seeds)``) and the test items' binomial standard error
(``collect.item_stderr``); otherwise the report says it is within noise.
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path

from ..evaluation.report import domain_avg
from ..fileio import atomic_write_json, atomic_write_text, read_json
from .collect import aggregate, gather, item_stderr, mean_std, optimizer_thread_s, task_domain
from .curves import CURVES_PLOT, HELDOUT_PLOT, curves_plot, experiment_curves, heldout_plot
from .figures import write_figures
from .heldout_report import heldout_sections
from .mc_report import mc_sections

PAPER_ADD_FRACTION = {"modula_flan": 0.198, "modula_res": 0.373}
SHORT = {"modula_humaneval": "humaneval"}


def _pct(mean, std=None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def _num(mean, std=None, digits=3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _header(tasks: list[str]) -> list[str]:
    names = [SHORT.get(t, t.removeprefix("modula_")) for t in tasks]
    return ["| model | " + " | ".join(names) + " | Avg. | domain loss ↓ |", "|---" * (len(tasks) + 3) + "|"]


def _row_line(label: str, row_or_scores, tasks: list[str], single: bool = False) -> str:
    if single:
        cells = [_pct(row_or_scores.get(t)) for t in tasks] + [_pct(row_or_scores.get("avg")),
                                                                _num(row_or_scores.get("domain_loss"))]
    else:
        cells = [_pct(*aggregate(row_or_scores, t)) for t in tasks] + [
            _pct(*aggregate(row_or_scores, "avg")), _num(*aggregate(row_or_scores, "domain_loss"))]
    return f"| {label} | " + " | ".join(cells) + " |"


class Noise:
    """The noise of a row's mean Avg.: the larger of the seeds' and the test items' standard error."""

    def __init__(self, limit, test_rows: dict[str, int]):
        self.limit, self.test_rows = limit, test_rows

    def se(self, row: dict | None, scores: dict | None, tasks: list[str], key: str = "avg") -> float:
        if row is None:  # the base model: one greedy evaluation
            return item_stderr(scores, tasks, self.limit, self.test_rows) or 0.0
        mean, std = aggregate(row, key)
        seeds = max(1, len(row["seeds"]))
        items = [item_stderr(s, tasks, self.limit, self.test_rows) for s in row["seeds"].values()]
        items = [i for i in items if i is not None]
        return max(std / math.sqrt(seeds) if std else 0.0, max(items) / math.sqrt(seeds) if items else 0.0)

    @staticmethod
    def verdict(diff: float, se_a: float, se_b: float) -> str:
        bound = 2 * math.sqrt(se_a ** 2 + se_b ** 2)
        if abs(diff) <= bound:
            return f"within noise ({100 * diff:+.1f} points, noise ±{100 * bound:.1f})"
        return f"{'higher' if diff > 0 else 'lower'} by {100 * abs(diff):.1f} points (noise ±{100 * bound:.1f})"


def cost_rows(data: dict, exp) -> tuple[list[str], dict]:
    """The cost table (training and add-domain), and its numbers for results.json."""
    added = f"add-domain:{exp.add_domain}" if exp.add_domain else None
    lines = ["| method | trainable params | tokens | scored | params × tokens | TFLOP | train s (workers, summed) | "
             "tokens/s per worker | resource-s | first start to last end, s |", "|---|---|---|---|---|---|---|---|---|---|"]
    numbers: dict = {}
    for method in exp.methods:
        costs = data["rows"][method]["costs"]
        cost = {k: mean_std([c["pipeline"][k] for c in costs.values() if "pipeline" in c])[0]
                for k in ("trainable_params", "tokens", "scored_tokens", "params_x_tokens", "flops", "train_s_sum",
                          "resource_s", "fit_wall_s")}
        per_seed = [c["pipeline"]["tokens"] / c["pipeline"]["worker_s_sum"] for c in costs.values()
                    if c.get("pipeline", {}).get("worker_s_sum")]
        cost["tokens_per_s_per_worker"] = mean_std(per_seed)[0]
        numbers[method] = {"train": cost}
        if cost["tokens"] is None:
            continue
        speed = f"{cost['tokens_per_s_per_worker']:,.0f}" if cost["tokens_per_s_per_worker"] is not None else "—"
        scored = f"{100 * cost['scored_tokens'] / cost['tokens']:.0f}%" if cost["scored_tokens"] and cost["tokens"] else "—"
        lines.append(f"| {method} | {cost['trainable_params']:,.0f} | {cost['tokens']:,.0f} | {scored} | "
                     f"{cost['params_x_tokens']:.3e} | {cost['flops'] / 1e12:.1f} | {cost['train_s_sum']:.0f} | "
                     f"{speed} | {cost['resource_s']:.0f} | {cost['fit_wall_s']:.0f} |")
    if not added or not exp.add_cost_against:
        return lines, numbers
    against = exp.add_cost_against
    lines += ["", f"Adding {exp.add_domain}: its cost, and that cost as a fraction of a {against} retrain on the "
              "same seed (the paper: 19.8% for Flan, 37.3% for Res, against MoLoRA, in trainable params × tokens).",
              "", f"| method | params × tokens | TFLOP | resource-s | first start to last end, s | % of {against}: params × tokens | "
              "% FLOPs | % resource-s | paper |", "|---|---|---|---|---|---|---|---|---|"]
    reference = data["rows"].get(f"{against} +{exp.add_domain}", {}).get("costs", {})
    for method in exp.methods:
        costs = data["rows"][f"{method} +{exp.add_domain}"]["costs"]
        events = {seed: c[added] for seed, c in costs.items() if added in c}
        if not events:
            continue
        cost = {k: mean_std([e[k] for e in events.values()])[0] for k in ("params_x_tokens", "flops", "resource_s",
                                                                              "fit_wall_s")}
        ratios = {}
        for key in ("params_x_tokens", "flops", "resource_s"):
            per_seed = [e[key] / reference[s][added][key] for s, e in events.items()
                        if added in reference.get(s, {}) and reference[s][added][key]]
            ratios[key] = mean_std(per_seed)
        numbers[method]["add"] = {**cost, "fraction_of_molora": {k: v[0] for k, v in ratios.items()}}
        paper = f"{100 * PAPER_ADD_FRACTION[method]:.1f}%" if method in PAPER_ADD_FRACTION else "—"
        lines.append(f"| {method} | {cost['params_x_tokens']:.3e} | {cost['flops'] / 1e12:.1f} | "
                     f"{cost['resource_s']:.0f} | {cost['fit_wall_s']:.0f} | " + " | ".join(
                         _pct(*ratios[k]) + "%" if ratios[k][0] is not None else "—"
                         for k in ("params_x_tokens", "flops", "resource_s")) + f" | {paper} |")
    return lines, numbers


def optimizer_share(rows: dict, span_s: float, cpus: int) -> dict | None:
    """``{thread_s, span_s, cpus, share}``: the CPU-thread-seconds in optimizer steps over the
    parts' span × the machine's CPUs (None before any part ran)."""
    if span_s <= 0:
        return None
    thread_s, span_s = round(optimizer_thread_s(rows), 3), round(span_s, 3)  # share: from what is stored
    return {"thread_s": thread_s, "span_s": span_s, "cpus": cpus, "share": round(thread_s / (span_s * cpus), 4)}


def timing(records: dict) -> tuple[float, dict]:
    """The time some part was running (the union of the parts' intervals: a gap between two runs of
    the command, when nothing ran, does not count) and the task-seconds per kind of part."""
    if not records:
        return 0.0, {}
    wall, end = 0.0, float("-inf")
    for start, stop in sorted((r["started_at"], r["ended_at"]) for r in records.values()):
        wall += max(0.0, stop - max(start, end))
        end = max(end, stop)
    kinds: dict[str, float] = {}
    for record in records.values():
        kinds[record["kind"]] = kinds.get(record["kind"], 0.0) + record["wall_s"]
    return wall, kinds


def write_experiment_report(exp, out: Path, records: dict, *, command: str = "") -> Path:
    """Write ``report.md``, ``results.json`` and the PNGs into ``out``; returns the report's path."""
    data = gather(exp, out)
    built = read_json(out / "data" / "datasets.json")["domains"] if (out / "data" / "datasets.json").is_file() else {}
    test_rows = {t: built.get(task_domain(t), {}).get("splits", {}).get("test", {}).get("rows", 0)
                 for t in data["tasks_added"]}
    noise, tasks, rows, base = Noise(exp.eval.limit, test_rows), data["tasks"], data["rows"], data["base"]
    trained = [m for m in exp.methods if rows[m]["seeds"]]
    seeds_done = sorted({s for row in rows.values() for s in row["seeds"]})
    wall, kinds = timing(records)
    invocations = read_json(out / "invocations.json") if (out / "invocations.json").is_file() else []
    command_wall = sum(i["wall_s"] for i in invocations)
    parts = [f"# Paper comparison at small scale ({len(seeds_done)} seed{'s' * (len(seeds_done) != 1)})", "",
             f"Command: `{command or 'modula-ray experiment paper'}`. Seeds {seeds_done}; domains "
             f"{', '.join(exp.domains)}; {exp.steps_per_part} optimizer steps per part (every method gets "
             f"{len(exp.domains) + 2} × {exp.steps_per_part} steps of the same batch shape on the same data); "
             + (f"lm-eval on the first {exp.eval.limit or 'all'} test items of each task, greedy (its tables: mean ± "
                "std over seeds, in %). " if exp.eval.suites else "no lm-eval suite (`eval.suites: []`). ")
             + "Machine: "
             f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}. Wall time: "
             + (f"{command_wall / 60:.1f} min over {len(invocations)} run(s) of the command; " if invocations else "")
             + f"parts' tasks: {', '.join(f'{k} {v / 60:.1f}' for k, v in sorted(kinds.items()))} task-minutes "
             "(concurrent).", ""]
    heldout_lines, heldout = heldout_sections(exp, out)
    mc_lines, multiple_choice = mc_sections(exp, out)
    parts += heldout_lines + mc_lines
    verdicts = []
    if exp.eval.suites:
        parts += _lm_eval_tables(exp, data, noise, trained, verdicts)
    cost_lines, cost_numbers = cost_rows(data, exp)
    parts += ["## Cost (from each run's ledger, mean over seeds)", "", "Training seconds are measured inside the "
              "workers (first to last optimizer step of each worker group, added up); scored is the share of the "
              "tokens that the loss scored (responses; the rest is prompt and chat template); tokens/s per worker is the "
              "tokens over those seconds × workers; resource-s is those seconds × "
              "workers × CPUs requested; first start to last end is the wall time of the method's Ray Train fits, "
              "start-up, queueing behind other parts and saving included. The parts share the machine, so seconds "
              "carry its contention; params × tokens and FLOPs do not.", "", *cost_lines, ""]
    optimizer = optimizer_share(rows, wall, _cpus())
    if optimizer:
        parts += [f"Optimizer steps took {optimizer['thread_s']:,.0f} CPU-thread-seconds (each fit's training "
                  "window × its workers × their torch threads, every fit of every run once; Tune trials not counted): "
                  f"{100 * optimizer['share']:.1f}% of the time parts ran × the machine's CPUs "
                  f"({wall:,.0f} s × {optimizer['cpus']}). The rest went to start-up, evaluation, judging, saving and "
                  "waiting.", ""]
    parts += _tune_section(exp, rows, records, tasks)
    figures, cost_quality = write_figures(exp, out, data)
    curves = experiment_curves(exp, out)
    for name, path in (("held-out loss", heldout_plot(heldout.get("loss", {}), out / HELDOUT_PLOT)),
                       ("validation loss curves", curves_plot(curves, out / CURVES_PLOT))):
        if path:
            figures[name] = path
    parts += _routing_section(exp, rows)
    parts += ["## Figures", "", *[f"![{name}]({path.name})" for name, path in figures.items()], ""]
    atomic_write_json(out / "results.json", {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command,
                                             "machine": {"platform": platform.platform(), "cpus": _cpus()},
                                             "seeds": seeds_done, "wall_s": command_wall, "parts_span_s": wall,
                                             "invocations": invocations, "task_s_by_kind": kinds,
                                             "tasks": tasks, "tasks_added": data["tasks_added"], "base": base,
                                             "base_added": data["base_added"], "rows": data["rows"],
                                             "costs": cost_numbers, "optimizer_share": optimizer,
                                             "heldout": heldout, "multiple_choice": multiple_choice,
                                             "curves": curves,
                                             "verdicts": verdicts, "parts": records,
                                             "cost_quality": [{"label": label, "resource_s": cost, "avg_pct": avg}
                                                              for label, cost, avg in cost_quality]})
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def _lm_eval_tables(exp, data: dict, noise: "Noise", trained: list[str], verdicts: list[str]) -> list[str]:
    """The verdicts (appended to ``verdicts``) and Tables 1, 3, 4 and 5, from lm-eval's suites."""
    tasks, rows, base = data["tasks"], data["rows"], data["base"]
    verdicts += (_verdicts(exp, rows, "trained", base, tasks, noise)
                 + _verdicts(exp, rows, "added", data["base_added"], data["tasks_added"], noise))
    parts = ["## What the lm-eval numbers say", "", "A difference counts only beyond twice its noise (the larger "
             "of the seeds' and the test items' standard error); anything smaller is reported as within noise.", "",
             *(verdicts or ["- nothing evaluated yet"]), ""]
    parts += ["## Table 1: domain tasks (%)", "", *_header(tasks)]
    if base:
        parts.append(_row_line("base model alone", base, tasks, single=True))
    parts += [_row_line(label, row, tasks) for label, row in rows.items() if row["kind"] in ("trained", "tuned")
              and row["seeds"]] + [""]
    if not trained and exp.add_domain:
        parts += [f"No run was evaluated before adding {exp.add_domain} (`eval.before_adding: false`): Table 4 "
                  "holds them, and Table 3 only the base model.", ""]
    parts += ["## Table 3: general capability retained (MMLU subjects outside every domain, %)", "",
              "| model | general acc | Δ vs base | general acc_norm | Δ vs base |", "|---|---|---|---|---|"]
    if base:
        parts.append(f"| base model alone | {_pct(base['general_acc'])} | — | {_pct(base['general_acc_norm'])} | — |")
    for method in trained:
        acc, norm = aggregate(rows[method], "general_acc"), aggregate(rows[method], "general_acc_norm")
        delta = lambda m, key: _pct(m - base[key]) if base and m is not None and base.get(key) is not None else "—"  # noqa: E731
        parts.append(f"| {method} | {_pct(*acc)} | {delta(acc[0], 'general_acc')} | {_pct(*norm)} | "
                     f"{delta(norm[0], 'general_acc_norm')} |")
    parts.append("")
    if exp.add_domain:
        added = [label for label, row in rows.items() if row["kind"] == "added" and row["seeds"]]
        parts += [f"## Table 4: after adding {exp.add_domain} (%)", "",
                  "lora and molora retrain from scratch on every domain; the MoDULA variants and mode train one "
                  f"expert and their router or gates. `old Avg.` is over the first {len(exp.domains)} domains' "
                  "tasks, before → after.", "", *_header(data["tasks_added"])[:1]]
        parts[-1] = parts[-1].replace(" | domain loss ↓ |", " | domain loss ↓ | old Avg. before → after |")
        parts.append("|---" * (len(data["tasks_added"]) + 4) + "|")
        if data["base_added"]:
            parts.append(_row_line("base model alone", data["base_added"], data["tasks_added"], single=True) + " — |")
        for label in added:
            row, method = rows[label], rows[label]["method"]
            old = mean_std([s.get("avg_old") for s in _with_old_avg(row, tasks).values()])
            parts.append(_row_line(label, row, data["tasks_added"]) + f" {_pct(*aggregate(rows[method], 'avg'))} → "
                         f"{_pct(*old)} |")
        parts.append("")
    judged = [(label, row) for label, row in rows.items() if any("judge" in s for s in row["seeds"].values())]
    if judged:
        first = next(s["judge"] for s in judged[0][1]["seeds"].values() if "judge" in s)
        parts += ["## Table 5: judged e-commerce generation", "", f"Judge: {first['judge']}; rubric {first['rubric']}; "
                  f"{first['limit']} items, seeds {exp.eval.judge_seeds}. An unparseable verdict counts as invalid.", "",
                  "| model | total (composition) | total (base model) | wins / losses / ties vs base | invalid |",
                  "|---|---|---|---|---|"]
        for label, row in judged:
            entries = [s["judge"] for s in row["seeds"].values() if "judge" in s]
            totals = mean_std([e["composition"]["total"] for e in entries])
            base_totals = mean_std([e["base"]["total"] for e in entries])
            pair = {k: sum(e["pairwise"][k] for e in entries) for k in ("a", "b", "tie", "invalid")}
            parts.append(f"| {label} | {_num(*totals, digits=2)} / {entries[0]['composition']['out_of']} | "
                         f"{_num(*base_totals, digits=2)} | {pair['a']} / {pair['b']} / {pair['tie']} | {pair['invalid']} |")
        parts.append("")
    return parts


def _verdicts(exp, rows: dict, kind: str, base: dict | None, tasks: list[str], noise: Noise) -> list[str]:
    """Each evaluated row of ``kind`` (trained, or added) against the base model and against
    ``compare_to``'s row of that kind; for trained rows, each tuned router against its default."""
    mine = {label: row for label, row in rows.items() if row["kind"] == kind and row["seeds"]}
    reference = next(((label, row) for label, row in mine.items() if row["method"] == exp.compare_to), None)
    lines = []

    def compare(label: str, row: dict, other: str, other_row: dict | None, other_scores: dict | None = None):
        a = aggregate(row, "avg")[0]
        b = other_scores["avg"] if other_scores else aggregate(other_row, "avg")[0]
        if a is not None and b is not None:
            lines.append(f"- {label} against {other}: " + noise.verdict(
                a - b, noise.se(row, None, tasks), noise.se(other_row, other_scores, tasks)))

    for label, row in mine.items():
        if base:
            compare(label, row, "the base model", None, base)
    for label, row in mine.items():
        if reference and label != reference[0]:
            compare(label, row, reference[0], reference[1])
    for label, row in rows.items():
        if kind == "trained" and row["kind"] == "tuned" and row["seeds"]:
            compare(label, row, "its default router", rows[row["method"]])
    return lines


def _with_old_avg(row: dict, tasks: list[str]) -> dict:
    for scores in row["seeds"].values():
        scores["avg_old"] = domain_avg({task: scores.get(task) for task in tasks})
    return row["seeds"]


def _tune_seeds(records: dict) -> str:
    """The seeds with a finished search, e.g. ``0`` or ``0, 1, 2``."""
    return ", ".join(map(str, sorted({int(k.split("/")[0].removeprefix("seed")) for k in records
                                      if k.endswith("/tune")})))


def _tune_section(exp, rows: dict, records: dict, tasks: list[str]) -> list[str]:
    """The tuned router beside the default one: the search's validation metrics, then lm-eval."""
    searched = [m for m in (exp.tune.methods if exp.tune else [])
                if any(k.endswith(f"/{m}/tune") for k in records)]
    if not searched:
        return []
    lines = ["## The router searched with Ray Tune, beside the default one", "",
             f"`modula-ray tune router` over a copy of each run ({exp.tune.num_samples} trials, space "
             f"`{exp.tune.space}`, seeds {_tune_seeds(records)}); validation rows as in the search; "
             + ("lm-eval as in Table 1." if exp.tune.evaluate else "the tuned routers are not evaluated with lm-eval "
                "(`tune.evaluate: false`), so their domain Avg. is blank."), "",
             "| method | router | val loss ↓ | routing accuracy | domain Avg. |", "|---|---|---|---|---|"]
    for method in searched:
        results = [r["result"] for k, r in records.items() if k.endswith(f"/{method}/tune")]
        for name, key, row in (("default", "before", rows[method]), ("tuned", "best", rows.get(f"{method} (tuned router)"))):
            loss = mean_std([(r[key] or {}).get("val_loss") for r in results])
            accuracy = mean_std([(r[key] or {}).get("routing_accuracy") for r in results])
            lines.append(f"| {method} | {name} | {_num(*loss)} | {_num(*accuracy, digits=2)} | "
                         f"{_pct(*aggregate(row, 'avg')) if row else '—'} |")
    return lines + [""]


def _routing_section(exp, rows: dict) -> list[str]:
    """Routing accuracy on each of the experiment's domains, for every evaluated row with a router:
    over every token of the validation prompts, and on the domain's own tokens (prompt body and
    response) per token and per sequence (the argmax of the row's mean gate)."""
    routed = [label for label, row in rows.items() if any("routing_accuracy" in s for s in row["seeds"].values())]
    if not routed:
        return []
    domains = [*exp.domains, *([exp.add_domain] if exp.add_domain else [])]
    measures = (("routing_accuracy", "prompt, every token"), ("routing_token_accuracy", "domain tokens, per token"),
                ("routing_sequence_accuracy", "domain tokens, per sequence"))
    lines = ["## Routing (Figure 3)", "", "The share of (router, token) pairs whose largest gate is the item's own "
             "domain expert, on validation rows, mean ± std over seeds; per sequence: the share of rows whose mean "
             "gate over their domain tokens is largest on their own expert. Chance is 1 / routed experts.", "",
             "| model | measure | " + " | ".join(domains) + " |", "|---" * (len(domains) + 2) + "|"]
    for label in routed:
        for key, name in measures:
            values = [s.get(key, {}) for s in rows[label]["seeds"].values()]
            if not any(values):
                continue
            cells = [_num(*mean_std([v.get(d) for v in values]), digits=2) for d in domains]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
