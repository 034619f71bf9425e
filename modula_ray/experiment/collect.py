"""Gather what the parts wrote into one table of numbers per row, seed by seed (Ray-free).

A row is ``base``, a method, ``<method> (tuned router)`` or ``<method> +<domain>``. Each holds,
per seed, the headline metric of every domain task (``evaluation.run.HEADLINE``), the general
scores, the domain loss, the routing accuracy and the ledger's cost of each training event.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..evaluation.report import domain_avg, headlines
from ..evaluation.run import HEADLINE
from ..fileio import read_json

TASK_DOMAIN = {"modula_humaneval": "code"}  # every other task is modula_<domain>


def task_domain(task: str) -> str:
    return TASK_DOMAIN.get(task, task.removeprefix("modula_"))


def tasks_of(domains: list[str]) -> list[str]:
    return [t for t in HEADLINE if task_domain(t) in domains]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def scores_of(suites: dict, tasks: list[str]) -> dict:
    """One evaluation's numbers: each task's headline, Avg. over ``tasks``, general, loss."""
    domain = suites.get("domain", {})
    general = suites.get("general", {}).get("modula_general", {})
    out = headlines(domain, tasks)
    out["avg"] = domain_avg(out)
    out["general_acc"], out["general_acc_norm"] = general.get("acc"), general.get("acc_norm")
    out["domain_loss"] = domain.get("modula_domain_loss", {}).get("nll_per_byte")
    for task_name, metrics in domain.items():
        if task_name.startswith("modula_loss_"):
            out[f"loss_{task_name.removeprefix('modula_loss_')}"] = metrics.get("nll_per_byte")
    return out


def run_scores(run_dir: Path, tasks: list[str]) -> dict | None:
    path, routing = run_dir / "eval" / "results.json", run_dir / "eval" / "routing.json"
    if not path.is_file() and not routing.is_file():
        return None
    suites = read_json(path)["suites"] if path.is_file() else {}  # no lm-eval suite: the routing alone
    scores = scores_of({name: entry["composition"] for name, entry in suites.items() if name != "judge"}, tasks)
    layers = read_json(routing).get("layers") if routing.is_file() else None
    if layers and layers.get("domains"):
        scores["routing_accuracy"] = {d: v["accuracy"] for d, v in layers["domains"].items()}
        for key in ("token_accuracy", "sequence_accuracy"):
            if layers.get("domain_tokens"):
                scores[f"routing_{key}"] = {d: v[key] for d, v in layers["domain_tokens"].items()}
    if "judge" in suites:
        scores["judge"] = suites["judge"]
    return scores


def ledger_costs(run_dir: Path) -> dict:
    """``{event: train.ledger.event_cost}`` of the run's ledger, plus ``train_s_sum``: the
    worker-side seconds of its records added up (``train_s`` is the critical path, which on a
    shared machine includes the waits between stages); ``worker_s_sum``: each record's ``train_s``
    times its workers (worker-seconds in optimizer steps); ``thread_s_sum``: that times each
    worker's torch threads (CPU-thread-seconds; 1 thread for records older than the field)."""
    from ..train.ledger import event_cost

    path = run_dir / "manifest.json"
    if not path.is_file():
        return {}
    ledger = read_json(path)["ledger"]
    return {event: {**event_cost(ledger, event), "train_s_sum": sum(r["train_s"] for r in ledger if r["event"] == event),
                    "worker_s_sum": sum(r["train_s"] * r.get("num_workers", 1) for r in ledger if r["event"] == event),
                    "thread_s_sum": sum(r["train_s"] * r.get("num_workers", 1) * r.get("threads_per_worker", 1)
                                        for r in ledger if r["event"] == event)}
            for event in dict.fromkeys(r["event"] for r in ledger)}


def optimizer_thread_s(rows: dict) -> float:
    """CPU-thread-seconds in optimizer steps over every run of the experiment, each fit counted once:
    a trained run's every event, an added run's add-domain events only (it is a copy of the
    trained run, whose ledger it carries). Tune trials keep no ledger and are not counted."""
    return sum(cost.get("thread_s_sum", 0.0) for row in rows.values() for costs in row["costs"].values()
               for event, cost in costs.items()
               if row["kind"] == "trained" or (row["kind"] == "added" and event.startswith("add-domain:")))


def gather(exp, out: Path) -> dict:
    """``{"rows": {label: {"kind", "method", "variant", "seeds": {seed: scores}, "costs": {seed: {event:
    cost}}}}, "base": scores, "tasks": [...], "tasks_added": [...]}``; a row's runs are the folders
    ``parts.run_folder(seed, method, variant)``."""
    from .parts import run_folder

    tasks = tasks_of(exp.domains)
    tasks_added = tasks_of(exp.domains + [exp.add_domain]) if exp.add_domain else tasks
    rows: dict[str, dict] = {}
    base_file = out / "base" / "results.json"
    base = scores_of(read_json(base_file)["suites"], tasks) if base_file.is_file() else None
    base_added = scores_of(read_json(base_file)["suites"], tasks_added) if base_file.is_file() else None
    variants = [("", "trained", tasks)]
    if exp.tune:
        variants.append(("-tuned", "tuned", tasks))
    if exp.add_domain:
        variants.append((f"+{exp.add_domain}", "added", tasks_added))
    for suffix, kind, row_tasks in variants:
        for method in exp.methods:
            if kind == "tuned" and method not in exp.tune.methods:
                continue
            label = {"trained": method, "tuned": f"{method} (tuned router)", "added": f"{method} +{exp.add_domain}"}[kind]
            row = {"kind": kind, "method": method, "variant": suffix, "seeds": {}, "costs": {}}
            for seed in exp.seeds:
                run_dir = out / run_folder(seed, method, suffix)
                scores = run_scores(run_dir, row_tasks)
                if scores is not None:
                    row["seeds"][seed] = scores
                if (run_dir / "manifest.json").is_file():
                    row["costs"][seed] = ledger_costs(run_dir)
            rows[label] = row
    return {"rows": rows, "base": base, "base_added": base_added, "tasks": tasks, "tasks_added": tasks_added}


def aggregate(row: dict, key: str) -> tuple[float | None, float | None]:
    return mean_std([scores.get(key) for scores in row["seeds"].values()])


def training_cost(row: dict) -> float | None:
    """Mean over the evaluated seeds of the resource-seconds of every event in the run's ledger
    (its training, and the domain added or the router searched since)."""
    return mean_std([sum(event["resource_s"] for event in costs.values())
                     for seed, costs in row["costs"].items() if seed in row["seeds"]])[0]


def item_stderr(scores: dict | None, tasks: list[str], limit: int | None, test_rows: dict[str, int]) -> float | None:
    """The binomial standard error of an Avg. over ``tasks`` from the test items alone:
    ``sqrt(sum_t q_t (1 - q_t) / n_t) / T``, ``n_t`` the items each task scored and
    ``q_t = (p_t n_t + 1) / (n_t + 2)``, so a score of 0 or 1 still carries its uncertainty."""
    if not scores or any(scores.get(t) is None for t in tasks):
        return None
    variance = 0.0
    for task in tasks:
        rows = test_rows.get(task) or limit or 1  # unknown: the limit
        n = max(1, min(rows, limit) if limit else rows)
        q = (scores[task] * n + 1) / (n + 2)
        variance += q * (1 - q) / n
    return math.sqrt(variance) / len(tasks)
