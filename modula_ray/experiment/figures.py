"""The experiment's PNGs: domain Avg. per row with seed error bars, and cost against quality."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def domain_avg_plot(bars: list[tuple[str, float, float]], base: float | None, path: Path, title: str) -> Path:
    """One bar per row: the mean domain Avg. over seeds (%) with ± one std; the base model as a line."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(5.0, 0.9 * len(bars) + 2), 3.8))
    labels = [label for label, _, _ in bars]
    axes.bar(range(len(bars)), [100 * m for _, m, _ in bars], yerr=[100 * s for _, _, s in bars], capsize=4,
             color=["tab:red" if "modula" in label else "tab:blue" if "mode" in label else "tab:gray"
                    for label in labels])
    if base is not None:
        axes.axhline(100 * base, color="black", linestyle="--", linewidth=1, label="base model alone")
        axes.legend(fontsize=8)
    axes.set_xticks(range(len(bars)), labels, rotation=25, ha="right", fontsize=8)
    axes.set_ylabel("domain Avg. (%), mean ± std over seeds")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def cost_quality_plot(points: list[tuple[str, float, float, float]], path: Path) -> Path:
    """Training resource-seconds (ledger) against the domain Avg., seed std as error bars."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for label, cost, quality, spread in points:
        axes.errorbar([cost], [100 * quality], yerr=[100 * spread], fmt="o", capsize=3)
        axes.annotate(label, (cost, 100 * quality), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.margins(0.25)
    axes.set_xlabel("training cost (resource-seconds from the ledger, mean over seeds)")
    axes.set_ylabel("domain Avg. (%)")
    axes.set_title("cost against quality (4 domains)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
