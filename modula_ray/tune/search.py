"""``tune_router``: search stage 3 over a run's frozen experts with Ray Tune, then install the best.

Before anything runs: the run must hold trained experts (and a method with a router), the search
file must validate against it, and ``max_concurrent`` trials must fit on the cluster at once.
Then a ``Tuner`` over ``trainable.router_trial`` runs the trials (ASHA by default), writing to
``RUN_DIR/tune/<name>/`` (one ``trial_<id>/`` per trial: Tune's results and TensorBoard events,
the trial's router, its per-step curves). A search of that name that did not finish is resumed
with ``Tuner.restore``: finished trials are kept, unfinished ones restart (their Train runs resume
from their checkpoints), and the search algorithm continues to ``num_samples``.

When every trial has ended: ``RUN_DIR/tune/trials.csv`` (every trial's hyperparameters and final
metrics) and the best completed trial's router installed into the run (``install.py``).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..assets import asset
from ..compose import Manifest
from ..config import PipelineConfig, load_config, to_dict
from ..errors import ArtifactError, ConfigError, ResourceUnavailableError
from ..fileio import atomic_write_json, atomic_write_text, read_json
from .install import install_router, recover_router
from .space import SearchSpec, load_spec
from .trainable import TrialContext, trial_folder

DEFAULT_SPACE = asset("tune-router.yaml")  # jobs/configs/tune-router.yaml, shipped in the package
TRIAL_DRIVER_MEMORY = 512 * 2 ** 20  # bytes, logical: what a trial's driver process holds
BEFORE = "router_before.json"  # the replaced router's entry and validation metrics
REPORTED = ("step", "val_loss", "routing_accuracy", "load_balance", "loss")


class SearchInterrupted(Exception):
    """The search stopped before every trial ended; the message says how to resume."""


def check_run(run_dir: Path) -> tuple[Manifest, PipelineConfig]:
    """The run's manifest and config, after checking it has a router stage and trained experts."""
    manifest = Manifest.read(run_dir)
    config = load_config(PipelineConfig, run_dir / "config.yaml")
    method = config.method_class
    if "router" not in method.parts or "router" not in method.stages:
        raise ConfigError("run", f"{run_dir} is a {config.method} run: it has no router to tune")
    missing = [d for d in config.domains if not (manifest["domains"].get(d) or {}).get("path")]
    if "universal" in method.parts and not manifest["universal"]:
        missing.insert(0, "universal")
    if missing:
        raise ArtifactError(run_dir / "manifest.json", f"no trained experts for {missing}: train them first "
                                                       f"(modula-ray train), then tune the router over them")
    manifest.check_lineage()
    return manifest, config


def check_concurrent(scaling, max_concurrent: int) -> None:
    """``max_concurrent`` trials' worker groups must fit on the cluster at once."""
    from ..train.resources import check_groups

    warnings = check_groups([(f"trial {i + 1}", scaling) for i in range(max_concurrent)])
    if warnings:
        raise ResourceUnavailableError(
            f"--max-concurrent {max_concurrent}: {max_concurrent} trials x {scaling.num_workers} worker(s) x "
            f"{scaling.worker_resources()} cannot run at once: {warnings[0]}; lower --max-concurrent or the "
            f"trial's resources (trial: in the search file)")


def _tuner(experiment: Path, spec: SearchSpec, context, default_steps: int, name: str):
    from ray import tune
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .progress import TrialPrinter
    from .space import tune_space
    from .trainable import router_trial, trial_dirname

    # The trial itself only drives a TorchTrainer (no CPU); its worker group asks for the real resources.
    trainable = tune.with_resources(tune.with_parameters(router_trial, context=context),
                                    {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    if tune.Tuner.can_restore(str(experiment)):
        saved = read_json(experiment / "search.json")
        if saved["fingerprint"] != spec.fingerprint():
            raise ConfigError("space", f"{experiment} holds a search over another space or settings; pass --name "
                                       f"to start a new search beside it")
        print(f"[tune] resuming the unfinished search {experiment} with Tuner.restore", flush=True)
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                  restart_errored=True, param_space=tune_space(spec))
    if spec.search.algorithm == "optuna":  # a Searcher: TuneConfig wraps it in a ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        algorithm, limit = OptunaSearch(seed=spec.search.seed), spec.search.max_concurrent
    else:  # a search generator limits itself (Tune ignores max_concurrent_trials for it)
        algorithm = BasicVariantGenerator(max_concurrent=spec.search.max_concurrent, random_state=spec.search.seed)
        limit = None
    # ASHA stops a trial that reaches max_t at that report, before its router is saved: set the horizon
    # one step past the longest trial, so rungs (grace x factor^k) are the only place trials stop.
    max_t = spec.max_steps(default_steps) + 1
    scheduler = (AsyncHyperBandScheduler(time_attr="step", max_t=max_t, grace_period=min(spec.scheduler.grace_period,
                                         max_t - 1), reduction_factor=spec.scheduler.reduction_factor)
                 if spec.scheduler.name == "asha" else FIFOScheduler())
    experiment.mkdir(parents=True, exist_ok=True)
    atomic_write_json(experiment / "search.json", {"fingerprint": spec.fingerprint(), "name": name,
                                                   "spec": to_dict(spec)})
    tuner = tune.Tuner(trainable, param_space=tune_space(spec), tune_config=tune.TuneConfig(
        metric=spec.search.metric, mode=spec.search.mode, search_alg=algorithm, scheduler=scheduler,
        num_samples=spec.search.num_samples, max_concurrent_trials=limit,
        trial_dirname_creator=trial_dirname), run_config=tune.RunConfig(
        name=name, storage_path=str(experiment.parent), verbose=0,
        callbacks=[TrialPrinter(spec.search.metric, spec.expected_trials())]))
    return tuner


def router_before(run_dir: Path, context) -> dict | None:
    """The validation metrics of the router installed before the search (what the best trial must
    beat), on the same rows; None when the run's router cannot be loaded (e.g. never trained)."""
    import dataclasses

    from ..compose import load_composition
    from ..evaluation.validation import RouterValidation
    from ..train.stages import STAGE_TASKS

    try:
        model, tokenizer = load_composition(run_dir)
    except (ArtifactError, FileNotFoundError) as exc:
        print(f"[tune] the run's current router does not load ({exc}); no baseline", flush=True)
        return None
    task = dataclasses.replace(STAGE_TASKS["router"](context.run, context.run.domains)[0],
                               validator_args=context.spec.validation.validator_args())
    metrics = {k: v for k, v in RouterValidation(tokenizer, task)(model).items() if k in REPORTED}
    print(f"[tune] the router before the search: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}", flush=True)
    return metrics


def trial_rows(experiment: Path, spec: SearchSpec) -> list[dict]:
    """One row per trial: id, status, hyperparameters, final metrics, seconds; best marked."""
    from ray.tune import ExperimentAnalysis

    rows = []
    for trial in ExperimentAnalysis(str(experiment)).trials:
        last = trial.last_result or {}
        saved = (trial_folder(experiment, trial.trial_id) / "ledger.json").is_file()  # router saved, fit returned
        status = {"TERMINATED": "completed" if saved else "stopped", "ERROR": "error"}.get(trial.status, "unfinished")
        row = {"search": experiment.name, "trial": trial.trial_id, "status": status,
               **{k: trial.config.get(k) for k in spec.space}}
        row.update({k: last.get(k) for k in REPORTED})
        row["time_s"] = round(last.get("time_total_s", 0.0), 1)
        rows.append(row)
    completed = [r for r in rows if r["status"] == "completed" and _finite(r[spec.search.metric])]
    best = (min if spec.search.mode == "min" else max)(completed, key=lambda r: r[spec.search.metric], default=None)
    for row in rows:
        row["best"] = row is best
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_trials(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def tune_router(run_dir, space=None, *, num_samples: int | None = None, max_concurrent: int | None = None,
                name: str = "router", command: str = "") -> dict:
    """Search, then install the best router; returns ``{"rows", "best", "experiment", "manifest"}``.
    Holds the run folder's lock (``runlock``) throughout: no other writer meets a half-installed router."""
    from ..runlock import run_lock

    run_dir = Path(run_dir).resolve()
    command = command or f"modula-ray tune router --run {run_dir} --name {name}"
    with run_lock(run_dir, command):
        return _search_and_install(run_dir, space, num_samples=num_samples, max_concurrent=max_concurrent, name=name,
                                   command=command)


def _search_and_install(run_dir: Path, space, *, num_samples: int | None, max_concurrent: int | None, name: str,
                        command: str) -> dict:
    from ..data.build import read_datasets_json
    from ..ray_session import connect_ray
    from ..train.pipeline import open_run, router_hyperparameters

    recover_router(run_dir)
    manifest, config = check_run(run_dir)
    data_domains = config.domains + [config.data.general_domain]
    spec = load_spec(space or DEFAULT_SPACE, config, num_samples=num_samples, max_concurrent=max_concurrent)
    config.check_base_model()  # the run's settings fit its base model, before any trial starts
    connect_ray(run_dir)
    check_concurrent(spec.trial or config.stages.router.scaling, spec.search.max_concurrent)
    run, _ = open_run(config, run_dir, command=command, write_config=False)
    built = read_datasets_json(run.data_dir)["domains"]
    experiment = run_dir / "tune" / name
    context = TrialContext(run=run, spec=spec, search=name, experiment_dir=str(experiment),
                           storage_path=config.storage_path or str(run_dir / "ray"), data_domains=data_domains,
                           train_rows={d: built[d]["splits"]["train"]["rows"] for d in data_domains})
    tuner = _tuner(experiment, spec, context, config.stages.router.steps, name)
    if not (experiment / BEFORE).is_file():
        atomic_write_json(experiment / BEFORE, {"router": manifest["router"], "metrics": router_before(run_dir, context)})
    expected = spec.expected_trials()
    tuner.fit()
    rows = trial_rows(experiment, spec)
    write_trials(run_dir / "tune" / "trials.csv", rows)
    ended = [r for r in rows if r["status"] != "unfinished"]
    if len(ended) < expected:
        raise SearchInterrupted(f"search interrupted: {len(ended)} of {expected} trials ended; resume it with the "
                                f"same command: {command}")
    best = next((r for r in rows if r["best"]), None)
    if best is None:
        raise ArtifactError(experiment, f"no trial completed ({[r['status'] for r in rows]}); see the trial "
                                        f"folders' error.txt and {run_dir / 'logs'}")
    sample = {k: best[k] for k in spec.space}
    best_config = context.config_for(sample)
    folder = trial_folder(experiment, best["trial"])
    ledger = [read_json(trial_folder(experiment, r["trial"]) / "ledger.json") for r in rows
              if r["status"] == "completed"]
    stage = best_config.stages.router
    manifest = install_router(
        run_dir, folder / "router", config=best_config, command=command, ledger=ledger,
        hyperparameters=router_hyperparameters(best_config.experts, to_dict(stage), stage.data_weights),
        metrics={k: best[k] for k in REPORTED},
        tuned={"search": name, "trial": best["trial"], "metric": spec.search.metric, "mode": spec.search.mode,
               "trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
               "stopped": sum(r["status"] == "stopped" for r in rows),
               "before": read_json(experiment / BEFORE)["metrics"]})
    return {"rows": rows, "best": best, "experiment": str(experiment), "manifest": manifest}
