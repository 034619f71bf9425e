"""``modula-ray tune report RUN_DIR``: the trial table and two figures, from ``RUN_DIR/tune/``.

``objective.png``    the objective against each hyperparameter, one panel each (log axis for
                     loguniform ones, categories side by side); the best trial is a star
``asha_curves.png``  the objective against optimizer steps for every trial, from Tune's
                     ``result.json`` of each trial folder: trials the scheduler stopped end early
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..evaluation.validation import METRICS
from ..fileio import read_json
from .search import BEFORE

OBJECTIVE_PLOT, CURVES_PLOT = "objective.png", "asha_curves.png"


def _value(text: str):
    if text in ("", "None"):
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text) if any(c in text for c in ".eEn") else int(text)
    except ValueError:
        return text


def read_trials(run_dir) -> list[dict]:
    with open(Path(run_dir) / "tune" / "trials.csv", newline="") as handle:
        return [{k: v if k in ("search", "trial", "status") else _value(v) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def format_trials(rows: list[dict], metric: str) -> str:
    columns = [k for k in rows[0] if k not in ("search", "best")]
    width = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(width[c]) for c in columns)]
    for row in sorted(rows, key=lambda r: (r["status"] != "completed", _sort_key(r[metric]))):
        lines.append("  ".join(_cell(row[c]).rjust(width[c]) for c in columns) + ("  <- best" if row["best"] else ""))
    return "\n".join(lines)


def _sort_key(value):
    return value if isinstance(value, (int, float)) else float("inf")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def objective_plot(rows: list[dict], space: dict, metric: str, path: Path, before: float | None = None) -> Path:
    plt = _plt()
    names = list(space)
    cols = min(4, max(1, len(names)))
    rows_n = -(-max(1, len(names)) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 3.0 * rows_n), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        values = [r[name] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})
        xs = values if numeric else [categories.index(str(v)) for v in values]
        for x, row in zip(xs, rows):
            marker = "*" if row["best"] else ("o" if row["status"] == "completed" else "x")
            ax.scatter([x], [row[metric]], marker=marker, s=140 if row["best"] else 36,
                       color="tab:red" if row["best"] else ("tab:blue" if row["status"] == "completed" else "grey"))
        if isinstance(space[name], dict) and "loguniform" in space[name]:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        if before is not None:
            ax.axhline(before, color="black", linestyle=":", linewidth=1)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} of each trial (star: best; x: stopped early; dotted: the router before the search)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_plot(experiment: Path, rows: list[dict], metric: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        results = Path(experiment) / f"trial_{row['trial']}" / "result.json"
        points = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
        points = [(p["step"], p[metric]) for p in points if "step" in p and p.get(metric) is not None]
        if points:
            steps, values = zip(*points)
            style = "-" if row["status"] == "completed" else "--"
            ax.plot(steps, values, style, marker="x" if row["status"] != "completed" else None, linewidth=2.5 if
                    row["best"] else 1.2, label=f"{row['trial']}{' (best)' if row['best'] else ''}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title("trials over steps (dashed: stopped by ASHA)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tune_report(run_dir) -> tuple[str, list[Path]]:
    """``(table text, [figure paths])`` of the run's latest search."""
    run_dir = Path(run_dir)
    rows = read_trials(run_dir)
    experiment = run_dir / "tune" / rows[0]["search"]
    spec = read_json(experiment / "search.json")["spec"]
    metric = spec["search"]["metric"]
    before = read_json(experiment / BEFORE)["metrics"] if (experiment / BEFORE).is_file() else None
    figures = [objective_plot(rows, spec["space"], metric, run_dir / "tune" / OBJECTIVE_PLOT,
                              (before or {}).get(metric)),
               curves_plot(experiment, rows, metric, run_dir / "tune" / CURVES_PLOT)]
    table = format_trials(rows, metric)
    if before:
        table += "\nthe router before the search: " + ", ".join(f"{k} {before[k]:.4g}" for k in METRICS if k in before)
    return table, figures
