"""Validation-loss curves of the experiment's runs, and the figures of its held-out losses (Ray-free).

A stage with ``validate_rows`` reports ``<stage>/val_loss`` (the mean over its domains of the
response cross-entropy on their first val rows; stage 2: each domain through its own expert) at
every log step, into the run's TensorBoard events. ``experiment_curves`` reads them back for
``results.json`` and the curves figure: whether each stage's loss had flattened by its last step.
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.report import pyplot
from .parts import run_folder

CURVES_PLOT = "val_loss_curves.png"
HELDOUT_PLOT = "heldout_loss.png"


def run_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """``{tag: [[step, val_loss], ...]}`` for every ``.../val_loss`` scalar (per-domain ones too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[list[float]]] = {}
    for events in sorted(Path(run_dir, "tensorboard").glob("**/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if "/val_loss" in tag:
                points = {e.step: round(e.value, 4) for e in accumulator.Scalars(tag)}  # a resumed stage repeats steps
                curves.setdefault(tag, []).extend([[step, value] for step, value in sorted(points.items())])
    return curves


def experiment_curves(exp, out: Path) -> dict[str, dict[str, dict]]:
    """``{label: {seed: {tag: points}}}`` for every trained and added run that logged validation."""
    variants = [("", "")] + ([(f"+{exp.add_domain}", f" +{exp.add_domain}")] if exp.add_domain else [])
    found: dict[str, dict[str, dict]] = {}
    for suffix, label_suffix in variants:
        for method in exp.methods:
            for seed in exp.seeds:
                curves = run_curves(out / run_folder(seed, method, suffix))
                if curves:
                    found.setdefault(f"{method}{label_suffix}", {})[str(seed)] = curves
    return found


def curves_plot(curves: dict[str, dict[str, dict]], path: Path) -> Path | None:
    """One panel per trained method (its first seed): each stage's mean validation loss over its steps."""
    panels = [(label, seeds[min(seeds)]) for label, seeds in curves.items() if "+" not in label]
    if not panels:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (label, tags) in zip(axes[0], panels):
        for tag, points in tags.items():
            if tag.endswith("/val_loss") and points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                        label=tag.removesuffix("/val_loss"))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("val loss (nats/token)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def heldout_plot(losses: dict[str, dict], path: Path) -> Path | None:
    """Each row's held-out loss over the old domains with its 95% interval, the base model as a line."""
    rows = [(label, entry["old"]) for label, entry in losses.items() if "old" in entry]
    if not rows:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 2), 3.6))
    points = [(label, old) for label, old in rows if label != "base model alone"]
    xs = range(len(points))
    axes.errorbar(xs, [o["value"] for _, o in points], fmt="o", capsize=4,
                  yerr=[[o["value"] - o["low"] for _, o in points], [o["high"] - o["value"] for _, o in points]])
    base = dict(rows).get("base model alone")
    if base:
        axes.axhline(base["value"], color="black", linestyle="--", linewidth=1, label="base model alone")
        axes.axhspan(base["low"], base["high"], color="grey", alpha=0.2)
        axes.legend(fontsize=8)
    axes.set_xticks(list(xs), [label for label, _ in points], rotation=25, ha="right", fontsize=8)
    axes.set_ylabel("held-out loss, old domains (nats/byte)")
    axes.set_title("held-out response loss with 95% bootstrap intervals (lower is better)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
