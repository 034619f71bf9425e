"""The three MoDULA stages (or a baseline's one) for a run folder, and ``add-domain``.

A run folder holds ``config.yaml`` (first line: the command), ``manifest.json``, the parts,
``tensorboard/`` and ``ray/`` (Ray Train storage). A finished stage is skipped unless
``force``; a stage whose inputs were retrained after it finished is stale and runs again.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..compose import MANIFEST, ROUTER_SETTINGS, RUN_CONFIG, Manifest
from ..config import PipelineConfig, dump_config, load_config, to_dict
from ..errors import ConfigError
from ..fileio import atomic_write_text, staged_copy
from ..models import base_fingerprint, files_fingerprint, resolve_base
from ..ray_session import connect_ray
from ..runlock import run_lock
from .launcher import default_storage, fit_concurrently
from .resources import check_groups
from .stages import STAGE_TASKS
from .task import RunContext, StageTask

DEPENDS = {"router": ("universal", "experts/"), "experts/": ("universal",), "joint": ("experts/",)}


def ensure_data(config: PipelineConfig, data_dir: Path, domains: list[str]) -> dict:
    """Reuse ``data_dir`` if it was built with the configured size and seed, else build it."""
    from ..data.build import DATASETS_JSON, build_datasets, read_datasets_json

    if (data_dir / DATASETS_JSON).is_file():
        built = read_datasets_json(data_dir)
        if (built["size"], built["seed"]) != (config.data.size, config.data.seed):
            raise ConfigError("data", f"{data_dir} was built with size {built['size']} seed {built['seed']}, the "
                                      f"config asks for size {config.data.size} seed {config.data.seed}")
    else:
        print(f"building data ({config.data.size}, seed {config.data.seed}) into {data_dir}", flush=True)
        built = build_datasets(config.data.size, config.data.seed, data_dir)
    missing = [d for d in domains if d not in built["domains"]]
    if missing:
        raise ConfigError("domains", f"{data_dir}/{DATASETS_JSON} has no {missing}")
    return built


def open_run(config: PipelineConfig, run_dir, *, command: str, write_config: bool = True
             ) -> tuple[RunContext, Manifest]:
    """The run's context and manifest (created if the folder holds none; saved by the ``Runner``)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_base(config.base_model)
    if (run_dir / MANIFEST).is_file():
        manifest = Manifest.read(run_dir)
        if manifest["method"] != config.method:
            raise ConfigError("method", f"{run_dir} holds a {manifest['method']} run; the config says {config.method}")
    else:
        manifest = Manifest.create(run_dir, method=config.method, experts=to_dict(config.experts),
                                   base_model={"name": config.base_model, "path": base,
                                               "sha256": base_fingerprint(base), "files_sha256": files_fingerprint(base)})
    data_dir = Path(config.data.dir).resolve() if config.data.dir else run_dir / "data"
    ensure_data(config, data_dir, config.domains + [config.data.general_domain])
    manifest.record_data(data_dir)
    if write_config:
        atomic_write_text(run_dir / RUN_CONFIG, dump_config(config, command))
    run = RunContext(config=config, run_dir=str(run_dir), data_dir=str(data_dir), base_model=base,
                     base_sha256=manifest["base_model"]["sha256"], run_id=manifest["run_id"],
                     domains=list(config.domains))
    return run, manifest


def router_hyperparameters(experts, stage: dict, data_weights: dict | None) -> dict:
    """What the manifest records of a router: its layer settings (``ExpertsConfig``) and the
    optimisation of the stage that trained it (``StageConfig`` as a dict)."""
    return {**{k: getattr(experts, k) for k in ROUTER_SETTINGS},
            **{k: stage[k] for k in ("aux_loss_coef", "route_loss_coef", "route_init_rows", "lr", "steps",
                                     "warmup_steps", "batch_size", "weight_decay")},
            "data_weights": data_weights}


class Runner:
    """Fits tasks for one run folder and keeps its manifest up to date after every stage."""

    def __init__(self, run: RunContext, manifest: Manifest, *, force: bool, event: str):
        self.run, self.manifest, self.force, self.event = run, manifest, force, event
        self.storage = run.config.storage_path or default_storage(run.run_dir)

    def stale(self, key: str) -> bool:
        state = self.manifest["stages"].get(key)
        if self.force or not state or not state.get("done"):
            return True
        for prefix, needs in DEPENDS.items():
            if key.startswith(prefix):
                for need in needs:
                    later = [s for k, s in self.manifest["stages"].items()
                             if k.startswith(need) and s.get("finished_at", 0) > state["finished_at"]]
                    if later:
                        return True
        return False

    def fit(self, tasks: list[StageTask]) -> None:
        tasks = [t for t in tasks if any(self.stale(key) for key in t.stage_keys)]
        run_names = {t.key: [self.manifest.start_stage(key, t.slug, force=self.force) for key in t.stage_keys][-1]
                     for t in tasks}
        if not tasks:
            return
        specs = {t.key: self.run.config.stage(t.stage, t.key.partition("/")[2] or None).scaling for t in tasks}
        for warning in check_groups([(k, s) for k, s in specs.items()]):
            print(f"warning: {warning}", flush=True)
        self.manifest.save()
        jobs = [dict(task=t, spec=specs[t.key], run_name=run_names[t.key],
                     storage_path=self.storage, max_failures=self.run.config.max_failures, event=self.event)
                for t in tasks]
        fit_concurrently(jobs, self._record)

    def _record(self, job: dict, record: dict, metrics: dict) -> None:
        task, manifest, method = job["task"], self.manifest, self.run.config.method_class
        summary = {k: metrics[k] for k in ("loss", "tokens", "examples", "truncated", "dropped") if k in metrics}
        domains = metrics.get("domains") or {}  # stage 2 together: each domain's own numbers
        if any(ref.part == "router" for ref in task.save):
            summary |= {k: metrics.get(k) for k in ("route", "gate_entropy")}
        for ref in task.save:
            if ref.part == "universal":
                manifest.record_universal(ref.path, summary)
            elif ref.part == "domain":
                manifest.record_domain(ref.domain, ref.path, domains.get(ref.domain, summary))
            else:
                manifest.record_router(ref.path, routed=method.routed_names(task.domains), metrics=summary,
                                       hyperparameters=router_hyperparameters(self.run.config.experts, task.hparams,
                                                                              task.data_weights))
        if "domain" not in method.parts:  # e.g. lora: the domains are only its data
            for domain in task.domains:
                manifest.record_domain(domain, None, {})
        manifest.order_domains(self.run.domains)  # router order, not finishing order
        manifest.add_ledger([record])
        for key in task.stage_keys:
            manifest.finish_stage(key, self.event)
        manifest.save()


def plan_groups(config: PipelineConfig) -> list[tuple[str, object]]:
    """Every worker group the plan will ask for: ``(stage key, ScalingSpec)``."""
    groups = []
    for stage in config.plan:
        domains = config.domains if stage == "experts" and not config.stages.experts.together else [None]
        groups += [(f"experts/{d}" if d else stage, config.stage(stage, d).scaling) for d in domains]
    return groups


def run_pipeline(config: PipelineConfig, run_dir, *, force: bool = False, command: str = "") -> Manifest:
    """Run every stage of ``config.method`` into ``run_dir``; returns the manifest."""
    config.check_base_model()  # the experts fit the base model, before Ray or any worker starts
    command = command or "modula-ray train"
    with run_lock(run_dir, command):
        connect_ray(run_dir)
        for name, spec in plan_groups(config):  # fail fast, before data or models are touched
            check_groups([(name, spec)])
        run, manifest = open_run(config, run_dir, command=command)
        runner = Runner(run, manifest, force=force, event="pipeline")
        for stage in config.plan:
            print(f"== stage {stage} ==", flush=True)
            runner.fit(STAGE_TASKS[stage](run, run.domains))
        return Manifest.read(run.run_dir)


def add_domain(name: str, run_dir, *, force: bool = False, command: str = "", overrides: list[str] | None = None
               ) -> Manifest:
    """Plug domain ``name`` into a finished run: modula trains one expert and the router; the
    baselines retrain their joint stage (their honest cost). Other experts stay byte-identical.
    ``overrides`` (``dotted.key=value``) change the run's config for this and later stages, e.g. the
    new expert's placement; they are recorded in config.yaml once the domain is in."""
    run_dir = Path(run_dir).resolve()
    command = command or f"modula-ray add-domain {name} --run {run_dir}"
    with run_lock(run_dir, command):
        Manifest.read(run_dir).check_lineage()  # the experts we keep must fit the universal
        config = load_config(PipelineConfig, run_dir / RUN_CONFIG, overrides)
        if name in config.domains and not force:
            raise ConfigError("domain", f"{name!r} is already in the composition {config.domains}")
        config = dataclasses.replace(config, domains=[d for d in config.domains if d != name] + [name])  # validates
        config.check_base_model()  # the experts (with any overrides) fit the base model, before any worker starts
        connect_ray(run_dir)
        # Built beside the run and swapped in whole: a reader, a new replica or a crash never meets a
        # manifest that lists the new domain before its router is trained.
        with staged_copy(run_dir, f"adding-{name}") as staging:
            run, manifest = open_run(config, staging, command=command, write_config=False)
            runner = Runner(run, manifest, force=True, event=f"add-domain:{name}")
            for stage in config.method_class.add_domain_plan:
                print(f"== {name}: stage {stage} ==", flush=True)
                runner.fit(STAGE_TASKS[stage](run, [name]))
            atomic_write_text(staging / RUN_CONFIG, dump_config(config, command))
            staged = Manifest.read(staging)
            staged.moved(staging, run_dir)
            staged.save()
        return Manifest.read(run_dir)


def run_stage(config: PipelineConfig, run_dir, stage: str, domain: str | None = None, *, force: bool = False,
              command: str = "") -> Manifest:
    """One stage alone (``jobs/train_stage.py``); its inputs must already be in the run folder."""
    if stage not in config.plan:
        raise ConfigError("stage", f"{stage!r} is not a stage of {config.method} ({config.plan})")
    command = command or "modula-ray stage"
    with run_lock(run_dir, command):
        connect_ray(run_dir)
        run, manifest = open_run(config, run_dir, command=command)
        tasks = STAGE_TASKS[stage](run, [domain] if domain else run.domains)
        Runner(run, manifest, force=force, event="pipeline").fit(tasks)
        return Manifest.read(run.run_dir)
