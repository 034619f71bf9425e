"""Run the lm-eval suites over a composition and its base model, through lm-eval's Python API.

``run_suite(run_dir, suite, limit=, seed=)`` evaluates the run's composition (``--model modula``
with ``run=``) and its base model alone (``base=``) on the suite's tasks from ``eval/tasks``, with
the chat template (as training formatted every example) and every lm-eval seed set to ``seed``,
and returns ``{"composition": {task: {metric: value}}, "base": {...}, "versions": {...}}``.
Same seed, same numbers: decoding is greedy and the task data is fixed.

The tasks read the test splits of the run's own data folder: it reaches them as lm-eval task
metadata (``data_dir``) of that one evaluation, never through the process environment, so runs
built on different data folders evaluate one after another in one process.

The suites are data: a task or group YAML whose ``metadata.suite`` names a suite belongs to it
(``suite_tasks``). A group without an aggregate metric of its own stands for its member tasks.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..assets import asset
from ..errors import ConfigError

# The paper-style table: one headline metric per domain task (higher is better).
HEADLINE = {"modula_math": "score", "modula_code": "score", "modula_humaneval": "pass_at_1",
            "modula_medicine": "acc_norm", "modula_finance": "acc_norm", "modula_ecommerce": "exact_match"}


class TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's task YAML, with ``!function module.name`` read as the string ``module.name``."""


TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def tasks_dir() -> Path:
    """``MODULA_RAY_TASKS`` if set, else the task YAMLs shipped in the package (``eval/tasks``)."""
    folder = Path(os.environ.get("MODULA_RAY_TASKS") or asset("eval", "tasks"))
    if not folder.is_dir():
        raise ConfigError("MODULA_RAY_TASKS", f"{folder} is not a folder of lm-eval task YAMLs")
    return folder


def read_task_yamls(folder: Path | None = None) -> dict[str, dict]:
    """``{task or group name: its YAML}`` of every file in ``folder`` (default ``tasks_dir()``);
    ``!function`` tags stay strings, so nothing they name is imported."""
    configs = {}
    for path in sorted(Path(folder or tasks_dir()).rglob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=TaskYamlLoader)
        name = (config.get("group") or config.get("task")) if isinstance(config, dict) else None
        if not isinstance(name, str):
            raise ConfigError("task", f"{path}: names no task or group")
        configs[name] = config
    return configs


def suite_tasks(folder: Path | None = None) -> dict[str, tuple[str, ...]]:
    """``{suite: task names}`` from the YAMLs' ``metadata.suite``; a group without
    ``aggregate_metric_list`` is replaced by its members (lm-eval reports nothing for it)."""
    configs = read_task_yamls(folder)

    def expand(name: str) -> list[str]:
        config = configs.get(name, {})
        if "group" in config and not config.get("aggregate_metric_list"):
            return [task for member in config["task"] for task in expand(member)]
        return [name]

    suites: dict[str, list[str]] = {}
    for name, config in configs.items():
        suite = (config.get("metadata") or {}).get("suite")
        if suite:
            suites.setdefault(suite, []).extend(expand(name))
    return {suite: tuple(names) for suite, names in suites.items()}


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"task": {"metric,filter": v, "alias": ...}}`` as ``{task: {metric: v}}``."""
    out = {}
    for task, values in results.items():
        out[task] = {key.split(",")[0]: value for key, value in values.items()
                     if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return out


def evaluate_model(model, tasks, *, data_dir=None, limit: int | None = None, seed: int = 0) -> tuple[dict, dict]:
    """``(metrics, task versions)`` of one lm-eval model object on ``tasks``, which read the test
    splits of ``data_dir`` (default: the model's own, ``ModulaLM.data_dir``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = data_dir or getattr(model, "data_dir", None)
    # one TaskManager per evaluation: lm-eval hands its metadata to every task's custom_dataset
    task_manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False,
                               metadata={"data_dir": str(folder)} if folder else {})
    out = simple_evaluate(model=model, tasks=list(tasks), limit=limit, apply_chat_template=True,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          task_manager=task_manager)
    return _metrics(out["results"]), dict(out.get("versions", {}))


def run_suite(run_dir, suite: str, *, limit: int | None = None, seed: int = 0, batch_size: int = 4,
              with_base: bool = True, model=None) -> dict:
    from ..compose import Manifest
    from .lm import ModulaLM

    suites = suite_tasks()
    if suite not in suites:
        raise ConfigError("suite", f"unknown suite {suite!r}; choose one of {sorted(suites)}")
    manifest = Manifest.read(run_dir)
    if model is None:  # else one already built for this run (``ModulaLM(run=run_dir)``)
        model = ModulaLM(run=str(run_dir), batch_size=batch_size)
    data_dir = manifest["data"]["dir"]  # the base model alone is scored on the same rows
    composition, versions = evaluate_model(model, suites[suite], data_dir=data_dir, limit=limit, seed=seed)
    entry = {"composition": composition, "versions": versions, "limit": limit, "seed": seed}
    if with_base:
        entry["base"], _ = evaluate_model(ModulaLM(base=manifest["base_model"]["name"], batch_size=batch_size),
                                          suites[suite], data_dir=data_dir, limit=limit, seed=seed)
    return entry
