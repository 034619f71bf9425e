"""The router search as data: ``jobs/configs/tune-router.yaml`` (its first line is the command).

``search``      ``algorithm`` (random | grid | optuna: TPE), ``metric`` (val_loss | routing_accuracy |
                load_balance, with its direction), ``num_samples``, ``max_concurrent``, ``seed``
``scheduler``   ``asha`` (default) or ``fifo``. ASHA compares trials at rungs of ``grace_period x
                reduction_factor^k`` optimizer steps, up to the largest ``steps`` in the space
``validation``  the held-out rows every report scores (``split``, ``rows`` per domain) and how
                often the trial reports (``every`` steps; default the run's ``stages.router.log_every``)
``trial``       each trial's worker group (a ScalingSpec); default: the run's ``stages.router.scaling``
``space``       hyperparameter -> a constant, or one of ``{choice: [...]}``, ``{grid: [...]}``,
                ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (hi excluded)

Every hyperparameter sets one field of the run's pipeline config (``PARAMS``), so a trial's
stage-3 task is built by the same code as the pipeline's. The ``experts.*`` ones (router settings)
are known only to a method whose config class has them, and each value is checked by that class. ``data_weights.<domain>`` multiplies that
domain's share of the router's data as built (1 = unchanged); the trial's
``stages.router.data_weights`` is the resulting mix.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import PipelineConfig, ScalingSpec, from_dict, load_config, set_dotted, to_dict
from ..errors import ConfigError
from ..evaluation.validation import METRICS
from ..experts import config_keys

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
WEIGHTS = "data_weights."


@dataclass(frozen=True)
class Param:
    field: str                                  # the dotted pipeline-config field it sets
    kind: type                                  # float | int | str
    check: Callable[[Any], bool] | None = None  # None: an experts.* setting, checked by the method's config class
    rule: str = ""                              # what ``check`` demands, for the error message
    optional: bool = False                      # None is a value (top_k: dense)

    @property
    def setting(self) -> str | None:
        """The method setting it sets (``experts.top_k`` -> ``top_k``), or None."""
        section, _, key = self.field.partition(".")
        return key if section == "experts" else None


PARAMS = {
    "lr": Param("stages.router.lr", float, lambda v: v > 0, "> 0"),
    "temperature": Param("experts.temperature", float),
    "top_k": Param("experts.top_k", int, optional=True),
    "aux_loss_coef": Param("stages.router.aux_loss_coef", float, lambda v: v >= 0, ">= 0"),
    "route_loss_coef": Param("stages.router.route_loss_coef", float, lambda v: v >= 0, ">= 0"),
    "route_init_rows": Param("stages.router.route_init_rows", int, lambda v: v >= 0, ">= 0"),
    "warmup_steps": Param("stages.router.warmup_steps", int, lambda v: v >= 0, ">= 0"),
    "steps": Param("stages.router.steps", int, lambda v: v >= 1, ">= 1"),
    "batch_size": Param("stages.router.batch_size", int, lambda v: v >= 1, ">= 1"),
    "weight_decay": Param("stages.router.weight_decay", float, lambda v: v >= 0, ">= 0"),
    "router_placement": Param("experts.router_placement", str),
}
WEIGHT_PARAM = Param("stages.router.data_weights", float, lambda v: v >= 0, ">= 0")


@dataclass
class SearchSettings:
    algorithm: str = "random"
    metric: str = "val_loss"
    num_samples: int = 8
    max_concurrent: int = 2
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (("algorithm", ALGORITHMS), ("metric", tuple(METRICS))):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("num_samples", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")

    @property
    def mode(self) -> str:
        return METRICS[self.metric]


@dataclass
class SchedulerSettings:
    name: str = "asha"
    grace_period: int = 10                      # optimizer steps every trial gets
    reduction_factor: int = 2

    def __post_init__(self):
        if self.name not in SCHEDULERS:
            raise ConfigError("name", f"must be one of {list(SCHEDULERS)}, got {self.name!r}")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("grace_period" if self.grace_period < 1 else "reduction_factor",
                              "grace_period must be >= 1 and reduction_factor >= 2")


@dataclass
class ValidationSettings:
    split: str = "val"
    rows: int = 8                               # per data domain
    every: int | None = None                    # steps between reports (default: stages.router.log_every)

    def __post_init__(self):
        if self.split not in ("val", "test", "train") or self.rows < 1 or (self.every is not None and self.every < 1):
            raise ConfigError("split", f"split is val|test|train, rows >= 1, every >= 1; got {self}")

    def validator_args(self) -> dict:
        """What ``evaluation.validation.RouterValidation`` reads from ``StageTask.validator_args``."""
        return {"split": self.split, "rows": self.rows}


@dataclass
class SearchSpec:
    search: SearchSettings = field(default_factory=SearchSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    trial: ScalingSpec | None = None
    space: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What decides the trials (not how many run at once): a resumed search must match it."""
        data = asdict(self)
        data["search"].pop("max_concurrent")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def expected_trials(self) -> int:
        """``num_samples``, times the size of every grid (with algorithm grid, every choice is one)."""
        total = self.search.num_samples
        for dist in self.space.values():
            if isinstance(dist, dict) and ("grid" in dist or (self.search.algorithm == "grid" and "choice" in dist)):
                total *= len(next(iter(dist.values())))
        return total

    def max_steps(self, default: int) -> int:
        dist = self.space.get("steps", default)
        if not isinstance(dist, dict):
            return int(dist)
        kind, values = next(iter(dist.items()))
        return int(values[1]) - 1 if kind == "randint" else int(max(values))


def param(name: str) -> Param:
    return WEIGHT_PARAM if name.startswith(WEIGHTS) else PARAMS[name]


def _check_value(where: str, p: Param, value, run: PipelineConfig) -> None:
    """A value of ``p`` the run can take: of its kind, and allowed by ``p.check`` or, for a method
    setting, by the method's config class (``top_k`` also against the run's routed experts)."""
    if value is None and p.optional:
        return
    if p.kind is str:
        ok = isinstance(value, str)
    else:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = number and (p.kind is float or float(value).is_integer())
    if not ok or (p.check is not None and not p.check(value)):
        raise ConfigError(where, f"{value!r} is not allowed: must be {p.kind.__name__} {p.rule}".rstrip())
    if p.setting is not None:
        try:
            settings = dataclasses.replace(run.experts, **{p.setting: p.kind(value)})
            settings.check_routed(len(run.method_class.routed_names(run.domains)))
        except ConfigError as exc:
            raise ConfigError(where, f"{value!r} is not allowed: {exc.message}") from None


def check_space(space: dict, run: PipelineConfig, *, source: str | None = None) -> None:
    """Raise ``ConfigError`` (``space.<name>``) for an unknown hyperparameter (or a setting the run's
    method does not have), a malformed or empty distribution, or a value the run cannot take (e.g.
    top_k above its routed experts)."""
    own = config_keys(type(run.experts))
    known = [name for name, p in PARAMS.items() if p.setting is None or p.setting in own] + [
        WEIGHTS + d for d in run.domains + [run.data.general_domain]]
    for name, dist in space.items():
        where = f"space.{name}"
        try:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
                hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
                raise ConfigError(where, f"unknown hyperparameter {name!r}; {hint}known: {known}")
            p = param(name)
            if not isinstance(dist, dict):
                _check_value(where, p, dist, run)
                continue
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ConfigError(where, f"a distribution is one key of {list(DISTRIBUTIONS)}, got {dist!r}")
            kind, values = next(iter(dist.items()))
            if kind in ("choice", "grid"):
                if not isinstance(values, list) or not values:
                    raise ConfigError(where, f"{kind} needs a non-empty list of values, got {values!r}")
                for value in values:
                    _check_value(where, p, value, run)
                continue
            if p.kind is str or p.optional or (kind != "randint" and p.kind is int):
                raise ConfigError(where, f"{name} takes {'choice, grid or randint' if p.kind is int else 'choice or grid'},"
                                         f" not {kind}")
            if (not isinstance(values, list) or len(values) != 2 or not all(isinstance(v, (int, float)) for v in values)
                    or not values[0] < values[1]):
                raise ConfigError(where, f"{kind} needs [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(where, f"loguniform needs low > 0, got {values[0]}")
            for value in (values if kind != "randint" else [values[0], values[1] - 1]):
                _check_value(where, p, value, run)
        except ConfigError as exc:
            raise ConfigError(exc.field, exc.message, source=source) from None


def load_spec(path, run: PipelineConfig, *, num_samples: int | None = None, max_concurrent: int | None = None
              ) -> SearchSpec:
    """The search file, validated against the run (its method's settings, routed experts and data
    domains); the command line's ``--num-samples`` / ``--max-concurrent`` win over the file's."""
    path = Path(path)
    counts = [f"search.{key}={value}" for key, value in (("num_samples", num_samples),
                                                          ("max_concurrent", max_concurrent)) if value is not None]
    spec = load_config(SearchSpec, path, counts)
    if spec.search.algorithm == "grid":
        loose = [k for k, v in spec.space.items() if isinstance(v, dict) and next(iter(v)) not in ("choice", "grid")]
        if loose:
            raise ConfigError(f"space.{loose[0]}", "search.algorithm grid needs every hyperparameter to be a "
                                                  "constant, choice or grid", source=str(path))
    if spec.search.algorithm == "optuna" and any(isinstance(v, dict) and "grid" in v for v in spec.space.values()):
        raise ConfigError("search.algorithm", "optuna cannot run grid distributions; use choice", source=str(path))
    check_space(spec.space, run, source=str(path))
    return spec


def tune_space(spec: SearchSpec) -> dict:
    """The space as Ray Tune sampling domains (``grid`` algorithm: every choice is a grid)."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    out = {}
    for name, dist in spec.space.items():
        if not isinstance(dist, dict):
            out[name] = dist
            continue
        kind, values = next(iter(dist.items()))
        out[name] = make["grid" if spec.search.algorithm == "grid" else kind](values)
    return out


def trial_config(base: PipelineConfig, spec: SearchSpec, sample: dict, train_rows: dict[str, int],
                 data_domains: list[str]) -> PipelineConfig:
    """The run's config with one trial's hyperparameters (and the trial's worker group) set."""
    data = copy.deepcopy(to_dict(base))
    for name, value in sample.items():
        if not name.startswith(WEIGHTS):
            set_dotted(data, PARAMS[name].field, value)
    if any(name.startswith(WEIGHTS) for name in sample):
        set_dotted(data, WEIGHT_PARAM.field, {d: train_rows[d] * float(sample.get(WEIGHTS + d, 1.0))
                                              for d in data_domains})
    if spec.trial is not None:
        set_dotted(data, "stages.router.scaling", asdict(spec.trial))
    if spec.validation.every is not None:
        set_dotted(data, "stages.router.log_every", spec.validation.every)
    return from_dict(PipelineConfig, data)
