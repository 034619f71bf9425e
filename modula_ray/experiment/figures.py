"""The experiment's PNGs: domain Avg. per row with seed error bars, cost against quality over
every evaluated row, and the routing figure (the paper's Figure 3) of each method with a router.
The cost and routing figures are the evaluation report's (``evaluation.report``)."""
from __future__ import annotations

from pathlib import Path

from ..evaluation.report import cost_quality_plot, pyplot, routing_plot
from ..fileio import read_json
from .collect import aggregate, training_cost
from .parts import run_folder

COST_PLOT = "cost_quality.png"


def domain_avg_plot(bars: list[tuple[str, str, float, float]], base: float | None, path: Path, title: str) -> Path:
    """One bar per ``(label, method, mean, std)``: the mean domain Avg. over seeds (%) with ± one
    std, one colour per method; the base model as a line."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(max(5.0, 0.9 * len(bars) + 2), 3.8))
    methods = list(dict.fromkeys(method for _, method, _, _ in bars))
    palette = plt.get_cmap("tab10")
    axes.bar(range(len(bars)), [100 * m for _, _, m, _ in bars], yerr=[100 * s for _, _, _, s in bars], capsize=4,
             color=[palette(methods.index(method) % palette.N) for _, method, _, _ in bars])
    if base is not None:
        axes.axhline(100 * base, color="black", linestyle="--", linewidth=1, label="base model alone")
        axes.legend(fontsize=8)
    axes.set_xticks(range(len(bars)), [label for label, _, _, _ in bars], rotation=25, ha="right", fontsize=8)
    axes.set_ylabel("domain Avg. (%), mean ± std over seeds")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def cost_points(exp, data: dict) -> list[tuple[str, float, float, float]]:
    """``(label, resource-s, Avg., std over seeds)`` of every evaluated row (trained, tuned or
    added), each with the Avg. over its own domains; and the base model at zero cost over the
    same domains (``base model +<domain>`` beside the added rows)."""
    rows, points = data["rows"], []
    for label, row in rows.items():
        (mean, std), cost = aggregate(row, "avg"), training_cost(row)
        if mean is not None and cost is not None:
            points.append((label, cost, mean, std or 0.0))
    kinds = {rows[label]["kind"] for label, *_ in points}
    if data["base"] and data["base"]["avg"] is not None and (kinds - {"added"} or not kinds):
        points.append(("base model", 0.0, data["base"]["avg"], 0.0))
    if "added" in kinds and data["base_added"] and data["base_added"]["avg"] is not None:
        points.append((f"base model +{exp.add_domain}", 0.0, data["base_added"]["avg"], 0.0))
    return points


def routing_figures(out: Path, rows: dict) -> dict[str, Path]:
    """For each method, Figure 3 of its first evaluated run (rows in order: trained, tuned, added;
    seeds in order) whose ``eval/routing.json`` has per-layer gates; a method with no router has none."""
    figures: dict[str, Path] = {}
    for label, row in rows.items():
        seed = next((s for s, scores in row["seeds"].items() if "routing_accuracy" in scores), None)
        path = out / f"routing_{row['method']}.png"
        if seed is not None and path not in figures.values():
            routing = out / run_folder(seed, row["method"], row["variant"]) / "eval" / "routing.json"
            figures[f"routing, {label} seed {seed}"] = routing_plot(read_json(routing)["layers"], path)
    return figures


def write_figures(exp, out: Path, data: dict) -> tuple[dict[str, Path], list[tuple[str, float, float]]]:
    """Every PNG into ``out``: ``({name: path}, the cost figure's (label, resource-s, Avg. %) as drawn)``."""
    rows, figures = data["rows"], {}
    for kinds, base, name, file, title in (
            (("trained", "tuned"), data["base"], "domain Avg. per model", "domain_avg.png",
             f"domain tasks ({', '.join(exp.domains)})"),
            (("added",), data["base_added"], f"after adding {exp.add_domain}", "domain_avg_added.png",
             f"after adding {exp.add_domain}")):
        bars = [(label, row["method"], *aggregate(row, "avg")) for label, row in rows.items() if row["kind"] in kinds]
        bars = [(label, method, mean, std or 0.0) for label, method, mean, std in bars if mean is not None]
        if bars:
            figures[name] = domain_avg_plot(bars, base and base["avg"], out / file, title)
    points, drawn = cost_points(exp, data), []
    if points:
        drawn = cost_quality_plot(points, out / COST_PLOT, "cost against quality (each row's Avg. over its domains)")
        figures["cost against quality"] = out / COST_PLOT
    return figures | routing_figures(out, rows), drawn
