"""Run the lm-eval suites over a composition and its base model, through lm-eval's Python API.

``run_suite(run_dir, suite, limit=, seed=)`` evaluates the run's composition (``--model modula``
with ``run=``) and its base model alone (``base=``) on the suite's tasks from ``eval/tasks``, with
the chat template (as training formatted every example) and every lm-eval seed set to ``seed``,
and returns ``{"composition": {task: {metric: value}}, "base": {...}, "versions": {...}}``.
Same seed, same numbers: decoding is greedy and the task data is fixed.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

SUITE_TASKS = {
    "domain": ("modula_math", "modula_code", "modula_humaneval", "modula_medicine", "modula_finance",
               "modula_ecommerce", "modula_domain_loss"),
    "general": ("modula_general",),
}
# The paper-style table: one headline metric per domain task (higher is better).
HEADLINE = {"modula_math": "score", "modula_code": "score", "modula_humaneval": "pass_at_1",
            "modula_medicine": "acc_norm", "modula_finance": "acc_norm", "modula_ecommerce": "exact_match"}


def tasks_dir() -> Path:
    """``eval/tasks`` of this checkout, or ``MODULA_RAY_TASKS``."""
    folder = Path(os.environ.get("MODULA_RAY_TASKS") or Path(__file__).resolve().parents[2] / "eval" / "tasks")
    if not folder.is_dir():
        raise ConfigError("MODULA_RAY_TASKS", f"{folder} is not a folder of lm-eval task YAMLs")
    return folder


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"task": {"metric,filter": v, "alias": ...}}`` as ``{task: {metric: v}}``."""
    out = {}
    for task, values in results.items():
        out[task] = {key.split(",")[0]: value for key, value in values.items()
                     if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return out


def evaluate_model(model, tasks, *, limit: int | None = None, seed: int = 0) -> tuple[dict, dict]:
    """``(metrics, task versions)`` of one lm-eval model object on ``tasks``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, tasks=list(tasks), limit=limit, apply_chat_template=True,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False))
    return _metrics(out["results"]), dict(out.get("versions", {}))


def run_suite(run_dir, suite: str, *, limit: int | None = None, seed: int = 0, batch_size: int = 4,
              with_base: bool = True, model=None) -> dict:
    from ..compose import read_manifest
    from .lm import ModulaLM

    if suite not in SUITE_TASKS:
        raise ConfigError("suite", f"unknown suite {suite!r}; choose one of {sorted(SUITE_TASKS)}")
    manifest = read_manifest(run_dir)
    if model is None:  # else one already built for this run (``ModulaLM(run=run_dir)``)
        model = ModulaLM(run=str(run_dir), batch_size=batch_size)
    composition, versions = evaluate_model(model, SUITE_TASKS[suite], limit=limit, seed=seed)
    entry = {"composition": composition, "versions": versions, "limit": limit, "seed": seed}
    if with_base:
        entry["base"], _ = evaluate_model(ModulaLM(base=manifest["base_model"]["name"], batch_size=batch_size),
                                          SUITE_TASKS[suite], limit=limit, seed=seed)
    return entry
