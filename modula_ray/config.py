"""Dataclass configs: YAML load/save, dotted CLI overrides, validation in ``__post_init__``.

Every bad value raises ``ConfigError`` naming the dotted field (``stages.router.lr``) and
the YAML file it came from. Saved YAML starts with the command that runs it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, require
from .experts import METHODS, ExpertsConfig, config_keys, method_class


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint, where: str):
    """Check ``value`` against a type hint (recursing into dataclasses, lists and dicts)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own error names the inner field
            return _coerce(value, others[0], where)
        for arg in others:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(where, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(where, f"expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data, *, prefix: str = "", source: str | None = None):
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    try:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(prefix or cls.__name__, f"expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in data:
            if key not in names:
                raise ConfigError(f"{prefix}.{key}" if prefix else str(key), f"unknown field; known: {names}")
        kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if prefix and not exc.field.startswith(prefix):
                raise ConfigError(f"{prefix}.{exc.field}", exc.message) from None
            raise
    except ConfigError as exc:
        if source and not exc.source:
            raise ConfigError(exc.field, exc.message, source=source) from None
        raise


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def set_dotted(data: dict, key: str, value) -> dict:
    """``data["stages"]["router"]["lr"] = value`` for ``key = "stages.router.lr"``."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"{part!r} is not a mapping")
    node[parts[-1]] = value
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["stages.router.lr=1e-3", "experts.top_k=2"]`` -> nested updates (values parsed as YAML)."""
    import yaml

    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "override must look like dotted.key=value")
        set_dotted(data, key, yaml.safe_load(raw))
    return data


def read_yaml(path) -> dict:
    """A YAML file's contents (``{}`` when empty); a missing or unparseable file is a ConfigError."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("config", "file not found", source=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"not valid YAML ({exc})", source=str(path)) from None


def load_config(cls, path, overrides: list[str] | None = None):
    return from_dict(cls, apply_overrides(read_yaml(path), overrides or []), source=str(path))


def dump_config(obj, command: str) -> str:
    """YAML text of ``obj`` whose first line is the command that runs it."""
    import yaml

    return f"# {command}\n" + yaml.safe_dump(to_dict(obj), sort_keys=False)


@contextmanager
def field_prefix(prefix: str, note: str = ""):
    """Re-raise a ConfigError from inside with its field under ``prefix`` (``top_k`` -> ``experts.top_k``)."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc.field}", exc.message + note, source=exc.source) from None


def _declaring_class(key: str) -> type | None:
    """The config class that declares ``key`` (the most general one, for a key several methods share)."""
    for config_class in dict.fromkeys(cls.config_class for cls in METHODS.values()):
        for klass in reversed(config_class.__mro__):
            if key in vars(klass).get("__annotations__", {}) and dataclasses.is_dataclass(klass):
                return klass
    return None


def experts_config(method: str, data, *, prefix: str = "experts") -> ExpertsConfig:
    """``method``'s settings (its ``config_class``, in ``experts/methods/<m>.py``) from the flat
    ``experts:`` mapping of a pipeline config (or a manifest).

    One file may serve several methods (``--set method=mode`` on a LoRA config), so the mapping may
    also hold keys that only other methods have, e.g. the LoRA ranks beside MoDE's spans: each such
    key is checked by the config class that declares it and is not part of this method's settings.
    A key that no method has raises ConfigError with a suggestion."""
    if isinstance(data, ExpertsConfig):
        data = to_dict(data)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping, got {data!r}")
    own = config_keys(method_class(method).config_class)
    for key, value in data.items():
        if key in own:
            continue
        owner = _declaring_class(key)
        if owner is None:
            known = sorted({k for cls in METHODS.values() for k in config_keys(cls.config_class)})
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"{prefix}.{key}", f"unknown field; {f'did you mean {close[0]!r}? ' if close else ''}"
                                                 f"known: {known}")
        from_dict(owner, {key: value}, prefix=prefix)
    return from_dict(method_class(method).config_class, {k: v for k, v in data.items() if k in own}, prefix=prefix)


@dataclass
class ScalingSpec:
    """One worker group: becomes a ``ray.train.ScalingConfig``."""

    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None  # e.g. {CPU: 0.5} or {CPU: 4, pool_math: 1}
    accelerator_type: str | None = None                   # e.g. A100, H100
    node_labels: dict[str, str] | None = None             # label_selector, e.g. {pool: math}
    torch_threads: int | None = None                      # CPU threads per worker (default: its CPUs)

    def __post_init__(self):
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        for name, amount in (self.resources_per_worker or {}).items():
            require(amount >= 0, f"resources_per_worker.{name}", f"must be >= 0, got {amount}")
        require(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be >= 1")

    def worker_resources(self) -> dict[str, float]:
        """What one worker asks Ray for (Ray Train adds 1 CPU by default, 1 GPU with use_gpu)."""
        resources = dict(self.resources_per_worker or {"CPU": 1.0})
        if self.use_gpu:
            resources.setdefault("GPU", 1.0)
        if self.accelerator_type:
            resources[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return resources


@dataclass
class StageConfig:
    """Optimisation and placement of one stage (or one domain's stage-2 run)."""

    steps: int = 20                          # optimizer steps
    batch_size: int = 4                      # examples per worker per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0                    # linear warmup, then cosine decay to 10% of lr
    max_grad_norm: float | None = 1.0
    aux_loss_coef: float = 0.0               # Switch load balance (router stages)
    route_loss_coef: float = 0.0             # supervised routing: -log P(row's own expert), router stages (objective.py)
    route_init_rows: int = 0                 # router stages: first fit the routers to N rows per domain (router_fit.py)
    log_every: int = 5
    validate_rows: int = 0                   # at every log: val loss on N val rows per domain (the curves; 0: none)
    checkpoint_every: int = 10
    data_weights: dict[str, float] | None = None  # domain mix; None = as built
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    deepspeed: dict | None = None            # {zero_stage: 2|3, ...extra DeepSpeed config}
    only_router: bool = False                # stage joint after stage 2 (mode): train the router/gates only
    compile: bool = False                    # torch.compile the forward (the first steps pay the compile)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        for name in ("weight_decay", "aux_loss_coef", "route_loss_coef", "route_init_rows", "warmup_steps",
                     "validate_rows"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        if self.deepspeed is not None:
            require(self.deepspeed.get("zero_stage", 2) in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0-3")


@dataclass
class ExpertStageConfig(StageConfig):
    """Stage 2 defaults plus per-domain overrides of any field, e.g. ``domains.math.scaling``.
    ``together``: every domain's expert in one worker group over one shared base (the mLoRA
    pattern, ``train/together.py``) instead of a worker group per expert."""

    domains: dict[str, dict] = field(default_factory=dict)
    together: bool = False


@dataclass
class StagesConfig:
    universal: StageConfig = field(default_factory=StageConfig)
    experts: ExpertStageConfig = field(default_factory=ExpertStageConfig)
    router: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-2, aux_loss_coef=0.01))
    joint: StageConfig = field(default_factory=StageConfig)


@dataclass
class DataConfig:
    size: str = "tiny"                       # tiny | demo | full (modula-ray data build --size)
    seed: int = 0
    dir: str | None = None                   # default: RUN_DIR/data, built if missing
    max_length: int = 256
    pack: bool = False
    general_domain: str = "general"          # stage-1 data, and part of the router/joint mix

    def __post_init__(self):
        require(self.size in ("tiny", "demo", "full"), "size", f"unknown size {self.size!r}")
        require(self.max_length >= 16, "max_length", f"must be >= 16, got {self.max_length}")


@dataclass
class PipelineConfig:
    """A whole composition: ``python jobs/pipeline.py --config CFG --out RUN_DIR``."""

    method: str = "modula_res"               # a registered method: lora | molora | modula_flan | modula_res | mode
    base_model: str = "tiny-llama"           # registered name or HF folder
    domains: list[str] = field(default_factory=lambda: ["math", "code"])
    seed: int = 0
    dtype: str = "auto"                      # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    max_failures: int = 0                    # ray.train.FailureConfig
    storage_path: str | None = None          # Ray Train storage; default RUN_DIR/ray (shared FS on clusters)
    # the method's settings: its config_class, built from a flat mapping by experts_config()
    experts: typing.Any = None
    data: DataConfig = field(default_factory=DataConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)

    def __post_init__(self):
        from .data.sources import SOURCES

        method_class(self.method)  # ConfigError naming the field, with "did you mean"
        self.experts = experts_config(self.method, self.experts)
        require(bool(self.domains), "domains", "name at least one domain")
        require(len(set(self.domains)) == len(self.domains), "domains", f"duplicates in {self.domains}")
        for name in self.domains + [self.data.general_domain] + list(self.stages.experts.domains):
            SOURCES.get(name, field="domains")
        with field_prefix("experts"):
            self.experts.check_routed(len(self.method_class.routed_names(self.domains)))
        require(self.data.general_domain not in self.domains, "data.general_domain",
                f"{self.data.general_domain!r} trains the universal expert; it cannot also be a domain")
        require(self.dtype in ("auto", "float32", "bfloat16"), "dtype", f"unknown dtype {self.dtype!r}")
        require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 retries forever)")
        for domain in self.stages.experts.domains:
            self.stage("experts", domain)  # validates each override now, before any Ray work
        if self.stages.experts.together:
            from .experts.layer import ExpertLinear

            require(issubclass(self.method_class, ExpertLinear) and "experts" in self.plan, "stages.experts.together",
                    f"trains LoRA-shaped domain experts in one group (modula_flan, modula_res); {self.method} "
                    f"{'trains whole layers' if 'experts' in self.plan else 'has no stage 2'}")
            require(not self.stages.experts.domains, "stages.experts.together",
                    f"one group trains every expert with one setting; drop stages.experts.domains "
                    f"({sorted(self.stages.experts.domains)})")
            require(self.stages.experts.deepspeed is None, "stages.experts.together",
                    "clips each expert's gradient on its own, which DeepSpeed's engine does not; drop deepspeed")
        if self.stages.joint.only_router:
            plan = self.plan
            require("joint" in plan and "experts" in plan[:plan.index("joint")], "stages.joint.only_router",
                    f"needs a plan that trains the experts before the joint stage; {self.method} runs {plan}")

    @property
    def method_class(self):
        return method_class(self.method)

    @property
    def plan(self) -> tuple[str, ...]:
        return self.method_class.stage_plan

    def stage(self, name: str, domain: str | None = None) -> StageConfig:
        """The stage's settings; for stage 2, with ``domain``'s overrides merged in."""
        config = getattr(self.stages, name)
        if name != "experts":
            return config
        merged = to_dict(config)
        merged.pop("together")
        per_domain = merged.pop("domains")
        overrides = per_domain.get(domain, {}) if domain else {}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return from_dict(StageConfig, merged, prefix=f"stages.experts.domains.{domain}" if domain else "stages.experts")

    def check_base_model(self) -> None:
        """Check the experts against the base model before any worker starts: inject them into the
        model built on the meta device from its config.json (module names and layer count, no
        weights). A setting that does not fit (a target module the model lacks, MoDE spans past its
        layers) raises ConfigError naming ``experts.<field>`` and the value."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from .experts import inject
        from .models import resolve_base

        config = AutoConfig.from_pretrained(resolve_base(self.base_model))  # may materialise it: not on meta
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        with field_prefix("experts", f" (base model {self.base_model})"):
            inject(model, self.method, self.domains, self.experts)

    def torch_dtype_name(self, use_gpu: bool) -> str:
        return ("bfloat16" if use_gpu else "float32") if self.dtype == "auto" else self.dtype
