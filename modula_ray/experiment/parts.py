"""The experiment as parts: what each one does, what it needs, and where its results land.

``DIR/`` of ``modula-ray experiment paper``::

    experiment.yaml                 the experiment file as run (first line: the command)
    data/                           one data folder for every run (same rows, same hashes)
    base/results.json               the base model alone (greedy, so one evaluation serves every seed)
    seed<S>/<method>/               a run folder: manifest, parts, eval/results.json, eval/routing.json
    seed<S>/<method>+<domain>/      a copy of it with the added domain (add-domain)
    seed<S>/<method>-tuned/         a copy of it whose router ``modula-ray tune router`` replaced
    parts/<key>.json                one per finished part: when, how long, where; never recomputed
    logs/<key>.log                  each part's own output

A part runs inside a Ray task (``runner``); its function here does the work with the train,
tune and evaluation packages and returns a small JSON-able summary.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import ExperimentConfig, pipeline_config, retrain_overrides

COPY_SKIP = ("eval", "ray", "tune", "logs", "tensorboard")  # a copy keeps the parts, not their history
KINDS_ON_CPUS = ("eval", "base", "judge")  # compute in the task itself; the others drive Train groups


@dataclass(frozen=True)
class Part:
    key: str                      # e.g. "seed0/modula_res/train"
    kind: str                     # base | train | eval | tune | add | judge
    run: str                      # folder relative to DIR
    method: str | None = None
    seed: int | None = None
    needs: tuple[str, ...] = field(default_factory=tuple)
    suites: tuple[str, ...] = ()  # eval parts

    @property
    def slug(self) -> str:
        return self.key.replace("/", "__")


def run_folder(seed: int, method: str, variant: str = "") -> str:
    return f"seed{seed}/{method}{variant}"


def plan(exp: ExperimentConfig) -> list[Part]:
    """Every part, each after the parts it needs."""
    parts = [Part("base/eval", "base", "base", suites=tuple(exp.eval.suites))] if exp.base_model_row else []
    tuned = set(exp.tune.methods) if exp.tune else set()
    added = f"+{exp.add_domain}" if exp.add_domain else ""
    for seed in exp.seeds:
        for method in exp.methods:
            at = lambda what: f"seed{seed}/{method}/{what}"  # noqa: E731
            run = run_folder(seed, method)
            parts.append(Part(at("train"), "train", run, method, seed))
            if exp.eval.before_adding or not added:
                parts.append(Part(at("eval"), "eval", run, method, seed, (at("train"),), tuple(exp.eval.suites)))
            if seed in exp.eval.judge_seeds and exp.eval.judge_limit:
                parts.append(Part(at("judge"), "judge", run, method, seed, (at("train"),)))
            if method in tuned and (exp.tune.seeds is None or seed in exp.tune.seeds):
                parts.append(Part(at("tune"), "tune", run_folder(seed, method, "-tuned"), method, seed, (at("train"),)))
                if exp.tune.evaluate:
                    parts.append(Part(at("tune-eval"), "eval", run_folder(seed, method, "-tuned"), method, seed,
                                      (at("tune"),), ("domain",)))
            if added:
                parts += [Part(at("add"), "add", run_folder(seed, method, added), method, seed, (at("train"),)),
                          Part(at("add-eval"), "eval", run_folder(seed, method, added), method, seed, (at("add"),),
                               ("domain",) if exp.eval.suites else ())]
    return parts


def copy_run(source: Path, target: Path) -> None:
    """A fresh copy of a finished run folder (its parts and manifest; not its evaluations,
    Ray storage or logs). A copy left by an unfinished part is replaced."""
    if target.exists():
        shutil.rmtree(target)
    partial = target.with_name(target.name + ".copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=lambda folder, names: [n for n in names if folder == str(source)
                                                                     and n in COPY_SKIP])
    partial.rename(target)


def do_train(part: Part, exp: ExperimentConfig, out: Path, config_file) -> dict:
    from ..train.pipeline import run_pipeline

    config = pipeline_config(exp, config_file, part.method, part.seed, out / "data")
    manifest = run_pipeline(config, out / part.run, command=f"modula-ray experiment paper (part {part.key})")
    return {"events": sorted({r["event"] for r in manifest["ledger"]})}


def do_add(part: Part, exp: ExperimentConfig, out: Path, config_file) -> dict:
    from ..train.pipeline import add_domain

    copy_run(out / run_folder(part.seed, part.method), out / part.run)
    manifest = add_domain(exp.add_domain, out / part.run, overrides=retrain_overrides(exp, part.method),
                          command=f"modula-ray experiment paper (part {part.key})")
    return {"domains": list(manifest["domains"])}


def do_tune(part: Part, exp: ExperimentConfig, out: Path, config_file) -> dict:
    from ..tune.search import tune_router
    from .config import resolve

    copy_run(out / run_folder(part.seed, part.method), out / part.run)
    result = tune_router(out / part.run, resolve(config_file, exp.tune.space), num_samples=exp.tune.num_samples,
                         max_concurrent=exp.tune.max_concurrent, command=f"modula-ray experiment paper ({part.key})")
    router = result["manifest"]["router"]
    return {"best": {k: v for k, v in result["best"].items() if k != "best"}, "before": router["tuned"]["before"],
            "trials": router["tuned"]["trials"], "completed": router["tuned"]["completed"],
            "hyperparameters": router["hyperparameters"]}


def do_eval(part: Part, exp: ExperimentConfig, out: Path, config_file) -> dict:
    from ..compose import Manifest
    from ..evaluation.heldout import run_heldout, save_heldout
    from ..evaluation.lm import ModulaLM
    from ..evaluation.multiple_choice import GENERAL, run_mc, save_mc
    from ..evaluation.report import save_results
    from ..evaluation.routing import routing_tables, save_routing
    from ..evaluation.run import run_suite
    from ..evaluation.specialisation import save_specialisation, specialisation_matrix
    from ..experts import method_class

    run_dir = out / part.run
    model = ModulaLM(run=str(run_dir), batch_size=4, dtype=exp.eval.dtype)  # loaded once for every measure
    composition = (model.model, model.tokenizer)
    for suite in part.suites:
        save_results(run_dir, suite, run_suite(run_dir, suite, limit=exp.eval.limit, with_base=False, model=model))
    if exp.eval.heldout_rows:
        save_heldout(run_dir / "eval", run_heldout(run_dir, rows=exp.eval.heldout_rows, composition=composition))
    before_adding = not (exp.add_domain and part.run.endswith(f"+{exp.add_domain}"))
    if exp.eval.mc_rows:
        domains = [*exp.domains, GENERAL] if before_adding else [exp.add_domain]
        save_mc(run_dir / "eval", run_mc(run_dir, rows=exp.eval.mc_rows, domains=domains, composition=composition))
    if Manifest.read(run_dir)["router"]:
        rows = exp.eval.routing_rows
        table, layers = routing_tables(run_dir, rows=rows, composition=composition)
        save_routing(run_dir, table, split="val", rows=rows, layers=layers)
        if exp.eval.specialisation_rows and before_adding and "experts" in method_class(part.method).stage_plan:
            save_specialisation(run_dir, specialisation_matrix(run_dir, rows=exp.eval.specialisation_rows,
                                                               composition=composition))
    return {"suites": list(part.suites)}


def do_base(part: Part, exp: ExperimentConfig, out: Path, config_file) -> dict:
    from ..config import PipelineConfig, load_config
    from ..evaluation.heldout import heldout_losses, save_heldout
    from ..evaluation.lm import ModulaLM
    from ..evaluation.multiple_choice import GENERAL, MAX_LENGTH, mc_accuracy, save_mc
    from ..evaluation.run import evaluate_model, suite_tasks
    from ..fileio import atomic_write_json
    from .config import resolve

    config = load_config(PipelineConfig, resolve(config_file, exp.pipeline), exp.overrides)
    name = config.base_model
    model, tasks = ModulaLM(base=name, data_dir=str(out / "data"), batch_size=4, dtype=exp.eval.dtype), suite_tasks()
    suites = {suite: evaluate_model(model, tasks[suite], limit=exp.eval.limit)[0] for suite in part.suites}
    if exp.eval.heldout_rows:
        domains = [*exp.domains, *([exp.add_domain] if exp.add_domain else []), config.data.general_domain]
        save_heldout(out / part.run, heldout_losses(model.model, model.tokenizer, out / "data", domains,
                                                    rows=exp.eval.heldout_rows, max_length=config.data.max_length))
    if exp.eval.mc_rows:
        domains = [*exp.domains, *([exp.add_domain] if exp.add_domain else []), GENERAL]
        save_mc(out / part.run, mc_accuracy(model.model, model.tokenizer, out / "data", domains, rows=exp.eval.mc_rows,
                                            max_length=MAX_LENGTH))
    atomic_write_json(out / part.run / "results.json", {"base_model": name, "limit": exp.eval.limit,
                                                         "suites": suites})
    return {"base_model": name}


def do_judge(part: Part, exp: ExperimentConfig, out: Path, config_file) -> dict:
    from ..evaluation.judges.client import JudgeConfig
    from ..evaluation.judges.suite import run_judge_suite
    from ..evaluation.report import save_results

    config = JudgeConfig.from_env(**({} if os.environ.get("MODULA_RAY_JUDGE_MODEL") else
                                     {"model": exp.eval.judge_model}))
    entry = run_judge_suite(out / part.run, limit=exp.eval.judge_limit, config=config)
    save_results(out / part.run, "judge", entry)
    return {"judge": entry["judge"]}


WORK = {"train": do_train, "add": do_add, "tune": do_tune, "eval": do_eval, "base": do_base, "judge": do_judge}
