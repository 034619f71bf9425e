"""``RUN/eval/results.json`` and the paper-style ``report.md`` (one run, or several side by side).

- **Domain table** (the paper's): one row per composition (named ``method (run)``) and one for the
  base model alone, one column per domain task's headline metric (``run.HEADLINE``), and Avg.;
- **general table**: MMLU subjects no domain trains on (acc, acc_norm), and the mean held-out
  loss per byte over the domains (lower is better);
- **judged generation**: the rubric's mean per criterion and total, invalid verdicts, the
  pairwise result against the base model, and which judge scored;
- **cost against quality** (``cost_quality.png``): each composition's training cost from its
  ledger (resource-seconds) against its domain Avg., the base model at zero.

Avg. is defined once here (``domain_avg``) and the cost-against-quality figure drawn once here
(``cost_quality_plot``); the experiment's report uses both.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..fileio import atomic_write_json, atomic_write_text, read_json
from .run import HEADLINE

RESULTS, REPORT, COST_PLOT, ROUTING_PLOT = "results.json", "report.md", "cost_quality.png", "routing_layers.png"


def save_results(run_dir, suite: str, entry: dict) -> Path:
    """Merge one suite's results into ``RUN/eval/results.json`` (other suites are kept)."""
    path = Path(run_dir) / "eval" / RESULTS
    results = read_json(path) if path.is_file() else {"suites": {}}
    results["suites"][suite] = entry | {"evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(path, results)
    return path


def headlines(metrics: dict, tasks: list[str] | None = None) -> dict[str, float | None]:
    """``{task: its headline metric (run.HEADLINE)}`` over ``tasks`` (default: the domain tasks
    ``metrics`` holds); ``None`` where a task has no such result."""
    tasks = [t for t in HEADLINE if t in metrics] if tasks is None else tasks
    return {task: metrics.get(task, {}).get(HEADLINE[task]) for task in tasks}


def domain_avg(scores: dict[str, float | None]) -> float | None:
    """Avg. = ``sum_t m_t / T``, the unweighted mean of the ``T`` domain tasks' headline metrics
    ``m_t`` (``headlines``); ``None`` unless every task has one."""
    values = list(scores.values())
    return statistics.fmean(values) if values and None not in values else None


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def domain_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: rows × domain tasks (percent), with Avg. over the tasks each row has."""
    head = "| model | " + " | ".join(t.removeprefix("modula_") for t in HEADLINE) + " | Avg. |"
    lines = [head, "|---" * (len(HEADLINE) + 2) + "|"]
    for label, metrics in rows:
        values = headlines(metrics, list(HEADLINE)).values()
        lines.append(f"| {label} | " + " | ".join(map(_fmt, values)) + f" | {_fmt(domain_avg(headlines(metrics)))} |")
    return "\n".join(lines)


def general_table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = ["| model | general acc | general acc_norm | domain loss (nll/byte, lower is better) |", "|---|---|---|---|"]
    for label, general, domain in rows:
        scores, loss = general.get("modula_general", {}), domain.get("modula_domain_loss", {}).get("nll_per_byte")
        lines.append(f"| {label} | {_fmt(scores.get('acc'))} | {_fmt(scores.get('acc_norm'))} | "
                     f"{'—' if loss is None else f'{loss:.3f}'} |")
    return "\n".join(lines)


def judge_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: per model, the judge's mean per criterion, total and valid verdicts; then each
    composition against its base model, pairwise in both orders."""
    criteria = ["helpfulness", "relevance", "accuracy", "readability", "fluency"]
    lines = ["| model | " + " | ".join(criteria) + " | total | valid / judged |", "|---" * (len(criteria) + 3) + "|"]
    for label, entry in rows:
        for name, scores in ((label, entry["composition"]), ("base model alone", entry["base"])):
            values = [f"{scores['criteria'][c]:.2f}" if c in scores["criteria"] else "—" for c in criteria]
            total = "—" if scores["total"] is None else f"{scores['total']:.2f} / {scores['out_of']}"
            lines.append(f"| {name} | " + " | ".join(values) + f" | {total} | {scores['valid']} / {scores['judged']} |")
    lines.append("")
    for label, entry in rows:
        pair = entry["pairwise"]
        lines.append(f"- {label} against the base model (both orders): wins {pair['a']}, losses {pair['b']}, "
                     f"ties {pair['tie']}, invalid {pair['invalid']} of {pair['judged']}")
    return "\n".join(lines)


def routing_plot(layers: dict, path: Path) -> Path:
    """The paper's Figure 3: for each domain's items, the mean gate per expert at the first,
    middle and last layer (one row of bar charts per domain)."""
    plt = pyplot()
    domains, experts = list(layers["domains"]), layers["experts"]
    figure, axes = plt.subplots(len(domains), 3, figsize=(9, 2.2 * len(domains)), squeeze=False, sharey=True)
    for row, domain in enumerate(domains):
        for col, key in enumerate(("first", "middle", "last")):
            axis = axes[row][col]
            axis.bar(range(len(experts)), layers["domains"][domain][key],
                     color=["tab:red" if e == domain else "tab:gray" for e in experts])
            axis.set_xticks(range(len(experts)), experts, rotation=30, fontsize=7)
            axis.set_title(f"{domain} items, {key} layer ({layers['layers'][key]})", fontsize=8)
    figure.supylabel("mean gate")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def cost_quality_plot(points: list[tuple[str, float, float, float]], path: Path,
                      title: str = "cost against quality") -> list[tuple[str, float, float]]:
    """One labelled point per ``(label, cost, Avg., spread)``: training resource-seconds from the
    ledger against the domain Avg. (%), ± ``spread`` (the seeds' std; 0 for one run). Returns the
    ``(label, cost, Avg. %)`` of every point drawn, read back from the figure."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for label, cost, quality, spread in points:
        axes.errorbar([cost], [100 * quality], yerr=[100 * spread], fmt="o", capsize=3)
        axes.annotate(label, (cost, 100 * quality), textcoords="offset points", xytext=(5, 4), fontsize=8)
    drawn = []
    for bar, note in zip(axes.containers, axes.texts):
        (x,), (y,) = bar.lines[0].get_data()
        drawn.append((note.get_text(), float(x), float(y)))
    axes.margins(0.25)  # room for the labels
    axes.set_xlabel("training cost (resource-seconds from the ledger)")
    axes.set_ylabel("domain Avg. (%)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def write_report(run_dirs: list, out: Path | None = None) -> Path:
    """The report of one run (``RUN/eval/report.md``) or of several side by side (``out``)."""
    from ..compose import Manifest

    runs = [(Path(r), Manifest.read(r), read_json(Path(r) / "eval" / RESULTS)) for r in run_dirs]
    out = Path(out) if out else runs[0][0] / "eval" / REPORT
    domain_rows, general_rows, points = [], [], []
    for run_dir, manifest, results in runs:
        label = f"{manifest['method']} ({run_dir.name})"
        domain = results["suites"].get("domain", {}).get("composition", {})
        general = results["suites"].get("general", {}).get("composition", {})
        domain_rows.append((label, domain))
        general_rows.append((label, general, domain))
        points.append((label, sum(r.get("resource_s", 0) for r in manifest["ledger"]), domain_avg(headlines(domain))))
    first_manifest, first_suites = runs[0][1], runs[0][2]["suites"]
    base = f"{first_manifest['base_model']['name']} (base alone)"
    domain_rows.append((base, first_suites.get("domain", {}).get("base", {})))
    general_rows.append((base, first_suites.get("general", {}).get("base", {}),
                         first_suites.get("domain", {}).get("base", {})))
    points.append((base, 0.0, domain_avg(headlines(domain_rows[-1][1]))))
    points = [(label, cost, avg, 0.0) for label, cost, avg in points if avg is not None]
    limit = first_suites.get("domain", {}).get("limit")
    parts = [f"# Evaluation: {', '.join(r[0].name for r in runs)}", "",
             f"lm-eval over `eval/tasks`, chat template, greedy, seed {first_suites.get('domain', {}).get('seed', 0)}"
             + (f", first {limit} items per task (`--limit`)" if limit else ", every test item") + ".", "",
             "## Domain tasks (%)", "", domain_table(domain_rows), "",
             "## General capability", "", general_table(general_rows), ""]
    judged = [(f"{m['method']} ({d.name})", r["suites"]["judge"]) for d, m, r in runs if "judge" in r["suites"]]
    if judged:
        parts += ["## Judged generation (e-commerce titles and keywords)", "",
                  f"Judge: {judged[0][1]['judge']}; rubric {judged[0][1]['rubric']}. An unparseable verdict is "
                  "counted invalid, never scored.", "", judge_table(judged), ""]
    routing_file = runs[0][0] / "eval" / "routing.json"
    layers = read_json(routing_file).get("layers") if routing_file.is_file() else None
    if layers and layers.get("domains"):
        plot = routing_plot(layers, out.parent / ROUTING_PLOT)
        on_tokens = layers.get("domain_tokens", {})
        cell = lambda d, key: f"{on_tokens[d][key]:.2f}" if d in on_tokens else "-"  # noqa: E731
        parts += ["## Routing", "", "Routing accuracy over the prompt: the share of (router, token) pairs whose "
                  "largest gate is the item's own domain expert. On domain tokens (prompt body and response, "
                  "after the chat template's shared head): per token, the router-mean gate's argmax; per "
                  "sequence, the argmax of its mean over the row.", "",
                  "| domain | routing accuracy (prompt) | per token | per sequence |", "|---|---|---|---|",
                  *[f"| {d} | {v['accuracy']:.2f} | {cell(d, 'token_accuracy')} | {cell(d, 'sequence_accuracy')} |"
                    for d, v in layers["domains"].items()], "",
                  f"![mean gate per expert at the first, middle and last layer]({plot.name})", ""]
    if points:
        cost_quality_plot(points, out.parent / COST_PLOT)
        parts += ["## Cost against quality", "", f"![cost against quality]({COST_PLOT})", ""]
    atomic_write_text(out, "\n".join(parts))
    return out
