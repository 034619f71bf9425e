"""The experiment file (``jobs/configs/paper-smollm2.yaml``) and the pipeline config of each run.

Every method gets the same data (one shared folder, one data seed) and the same token budget:
with ``u = steps_per_part``, ``n`` domains and one batch shape for every stage,

- MoDULA: universal ``u``, each domain's expert ``u``, router ``u``: ``(n + 2) u`` steps;
- ``lora`` / ``molora``: one joint stage of ``(n + 2) u`` steps;
- ``mode``: each domain's expert ``u``, then the joint stage ``2 u``: ``(n + 2) u``.

Adding a domain: MoDULA and ``mode`` train one expert (``u``) and the router or gates (``u``);
``lora`` and ``molora`` retrain from scratch on ``n + 1`` domains, ``(n + 3) u`` steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import PipelineConfig, dump_config, from_dict, load_config, read_yaml, require, to_dict
from ..errors import ConfigError

DEFAULT_METHODS = ["lora", "molora", "modula_flan", "modula_res", "mode"]


@dataclass
class TuneSettings:
    """``modula-ray tune router`` over a copy of each named method's run (the default router stays)."""

    methods: list[str] = field(default_factory=lambda: ["modula_flan", "modula_res"])
    space: str = "tune-router-paper.yaml"    # relative to the experiment file's folder
    num_samples: int = 3
    max_concurrent: int = 2
    evaluate: bool = True                    # lm-eval's domain suite over the tuned router too
    seeds: list[int] | None = None           # the seeds whose routers are searched (null: every seed)

    def __post_init__(self):
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.max_concurrent >= 1, "max_concurrent", f"must be >= 1, got {self.max_concurrent}")


@dataclass
class EvalSettings:
    limit: int | None = 8                    # lm-eval: the first N test items of each task (None: all)
    suites: list[str] = field(default_factory=lambda: ["domain", "general"])  # before adding a domain
    before_adding: bool = True               # false: evaluate only the runs with the added domain (and the base)
    routing_rows: int = 8                    # validation prompts per domain for the routing figure
    cpus: float = 1.0                        # each evaluation's Ray task
    judge_limit: int = 0                     # judged e-commerce generation items (0: no judge suite)
    judge_seeds: list[int] = field(default_factory=lambda: [0])
    judge_model: str = "smollm2-135m"        # served by the experiment unless MODULA_RAY_JUDGE_URL names one
    heldout_rows: int = 0                    # held-out response loss, item by item, on N test rows per domain
    specialisation_rows: int = 0             # methods with domain experts, before adding: each alone on N rows
    mc_rows: int = 0                         # multiple-choice accuracy on N held-out items per MMLU domain and
                                             #   general MMLU (before adding; the added domain's after adding)
    bootstrap: int = 2000                    # resamples of the held-out items behind each 95% interval
    dtype: str = "float32"                   # the evaluated models' weights: float32 | bfloat16 (on CPUs with
                                             #   AVX512-BF16 about 2x faster, losses move ~1%: docs/RESULTS.md)

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        for suite in self.suites:
            require(suite in ("domain", "general"), "suites", f"unknown suite {suite!r}; domain | general")
        require("domain" in self.suites or (self.heldout_rows and not self.suites), "suites",
                "the domain suite is the experiment's main table (or none at all, with heldout_rows)")
        for name in ("heldout_rows", "specialisation_rows", "mc_rows"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.dtype in ("float32", "bfloat16"), "dtype", f"float32 or bfloat16, got {self.dtype!r}")
        require(self.bootstrap >= 100, "bootstrap", f"must be >= 100 resamples, got {self.bootstrap}")
        require(self.cpus > 0, "cpus", f"must be > 0, got {self.cpus}")
        require(self.judge_limit >= 0, "judge_limit", f"must be >= 0, got {self.judge_limit}")


@dataclass
class ExperimentConfig:
    """``modula-ray experiment paper --config FILE --out DIR [--seeds 0,1,2]``."""

    pipeline: str = "demo.yaml"              # model, data, ranks and stage settings (relative to this file)
    overrides: list[str] = field(default_factory=list)  # dotted overrides of that pipeline config
    method_overrides: dict[str, list[str]] = field(default_factory=dict)  # one method's own, after those
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    base_model_row: bool = True              # evaluate the base model alone
    domains: list[str] = field(default_factory=lambda: ["math", "code", "medicine", "ecommerce"])
    add_domain: str | None = "finance"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    compare_to: str | None = "lora"          # the report holds every method against this one
    add_cost_against: str | None = "molora"  # add-domain cost as a fraction of this method's retrain
    steps_per_part: int = 8                  # u: the token budget (module docstring)
    max_parallel: int = 3                    # parts (Ray tasks) in flight at once
    tune: TuneSettings | None = field(default_factory=TuneSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        from ..data.sources import SOURCES
        from ..experts import method_class

        require(bool(self.methods), "methods", "name at least one method")
        require(len(set(self.methods)) == len(self.methods), "methods", f"duplicates in {self.methods}")
        for i, name in enumerate(self.methods):
            try:
                method_class(name)
            except ConfigError as exc:
                raise ConfigError(f"methods[{i}]", exc.message) from None
        for name in self.domains + ([self.add_domain] if self.add_domain else []):
            SOURCES.get(name, field="domains")
        for key in ("compare_to", "add_cost_against"):
            name = getattr(self, key)
            require(name is None or name in self.methods, key, f"{name!r} is not in methods {self.methods}")
        for name in self.method_overrides:  # a method the experiment does not run may keep its settings
            try:
                method_class(name)
            except ConfigError as exc:
                raise ConfigError(f"method_overrides.{name}", exc.message) from None
        require(self.add_domain not in self.domains, "add_domain", f"{self.add_domain!r} is already in domains")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"name distinct seeds, got {self.seeds}")
        require(self.steps_per_part >= 1, "steps_per_part", f"must be >= 1, got {self.steps_per_part}")
        require(self.max_parallel >= 1, "max_parallel", f"must be >= 1, got {self.max_parallel}")
        for name in (self.tune.methods if self.tune else []):
            require(name in self.methods, "tune.methods", f"{name!r} is not in methods {self.methods}")
            require("router" in method_class(name).stage_plan, "tune.methods", f"{name} has no router stage")

    def budget(self, method: str, n_domains: int) -> dict[str, int]:
        """Optimizer steps per stage of ``method`` with ``n_domains`` domains (module docstring)."""
        from ..experts import method_class

        u, plan = self.steps_per_part, method_class(method).stage_plan
        steps = {stage: u for stage in plan if stage != "joint"}
        spent = sum(u * (n_domains if stage == "experts" else 1) for stage in steps)
        if "joint" in plan:
            steps["joint"] = (n_domains + 2) * u - spent
        steps.setdefault("router", u)  # the add-domain plan's router or gate stage
        return steps


def load_experiment(path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment file (after the one it ``extends``, if any) with ``--set`` overrides."""
    from ..config import apply_overrides

    data = read_extended(Path(path))
    return from_dict(ExperimentConfig, apply_overrides(data, overrides or []), source=str(path))


def read_extended(path: Path, seen: tuple = ()) -> dict:
    """The YAML mapping of ``path``; with ``extends: OTHER.yaml`` (relative to it), OTHER's mapping
    updated by this one's, mappings merged key by key."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("config", f"expected a mapping, got {type(data).__name__}", source=str(path))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = resolve(path, parent)
    if not parent_path.is_file():
        raise ConfigError("extends", f"{parent_path} not found", source=str(path))
    if parent_path in seen or parent_path == path.resolve():
        raise ConfigError("extends", f"{parent} extends itself (through {[str(p) for p in seen]})", source=str(path))
    return merge(read_extended(parent_path, (*seen, path.resolve())), data)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(config_file, name: str) -> Path:
    """A path named in the experiment file: absolute, or relative to that file's folder; a bare
    file name that is not there but ships in the package is the packaged file (the default search
    spaces: ``tune.space: tune-router-paper.yaml`` works beside any experiment file)."""
    from ..assets import asset

    path = Path(name)
    if path.is_absolute():
        return path
    beside = Path(config_file).resolve().parent / path
    packaged = asset(name) if path.name == name else None
    return packaged if not beside.exists() and packaged and packaged.is_file() else beside


def pipeline_config(exp: ExperimentConfig, config_file, method: str, seed: int, data_dir) -> PipelineConfig:
    """The run's config: the pipeline file, the experiment's overrides and the method's own, then
    method, domains, seed, the shared data folder and the budget's steps."""
    steps = exp.budget(method, len(exp.domains))
    overrides = [*exp.overrides, *exp.method_overrides.get(method, []), f"method={method}", f"domains=[{', '.join(exp.domains)}]", f"seed={seed}",
                 f"data.dir={data_dir}", *[f"stages.{stage}.steps={n}" for stage, n in steps.items()]]
    return load_config(PipelineConfig, resolve(config_file, exp.pipeline), overrides)


def retrain_overrides(exp: ExperimentConfig, method: str) -> list[str]:
    """``add-domain`` overrides: a method that retrains its joint stage gets the budget of n + 1 domains."""
    steps = exp.budget(method, len(exp.domains) + 1)
    return [f"stages.joint.steps={steps['joint']}"] if "joint" in steps and "experts" not in steps else []


def check_same_experiment(saved: dict, exp: ExperimentConfig, where) -> None:
    """A rerun into the same folder must be the same experiment (more or fewer seeds is fine)."""
    ignore = {"seeds", "max_parallel"}
    mine = {k: v for k, v in to_dict(exp).items() if k not in ignore}
    theirs = {k: v for k, v in from_dict(ExperimentConfig, saved).__dict__.items() if k not in ignore}
    theirs = {k: to_dict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in theirs.items()}
    changed = sorted(k for k in mine if mine[k] != theirs.get(k))
    if changed:
        raise ConfigError(changed[0], f"{where} holds an experiment with other settings ({', '.join(changed)}); "
                                      f"pass another --out, or restore the file's settings")


def dump_experiment(exp: ExperimentConfig, command: str) -> str:
    return dump_config(exp, command)
