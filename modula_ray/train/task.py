"""``StageTask``: everything one Ray Train worker group needs, as plain JSON-able data."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..compose import PartRef

# Tests only: JSON that every task built while it is set carries as ``after_step`` (the task reaches the
# Ray Train worker processes; the driver's environment does not)
AFTER_STEP_ENV = "MODULA_RAY_AFTER_STEP"
VALIDATOR = "modula_ray.evaluation.validation:RouterValidation"  # imported in the worker, by name


@dataclass
class StageTask:
    key: str                   # universal | experts/<domain> | experts (all together) | router | joint
    stage: str                 # the set_stage name
    method: str
    domains: list[str]         # the model's domain experts, router order
    base_model: str            # HF folder
    experts: dict              # ExpertsConfig as a dict (target_modules + layer kwargs)
    data_dir: str
    data_domains: list[str]
    hparams: dict              # StageConfig as a dict
    run_dir: str
    dtype: str = "float32"
    max_length: int = 256
    pack: bool = False
    seed: int = 0
    data_weights: dict | None = None
    load: list[PartRef] = field(default_factory=list)
    save: list[PartRef] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    log_to_files: bool = True  # worker stdout/stderr -> RUN_DIR/logs/<slug>.rank<r>.log
    tensorboard_dir: str | None = None  # default RUN_DIR/tensorboard/<slug>
    # "module:Class" built once as Class(tokenizer, task); called with the model at every report, its
    # metrics join the report (Tune sets the evaluation package's RouterValidation; train imports none)
    validator: str | None = None
    validator_args: dict = field(default_factory=dict)
    # {"call": "module:function", **kwargs}: the loop calls function(state, **kwargs) after every optimizer
    # step; only tests set it (through AFTER_STEP_ENV), e.g. to kill a worker and test the resume
    after_step: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StageTask":
        data = dict(data)
        data["load"] = [PartRef(**p) for p in data.get("load", [])]
        data["save"] = [PartRef(**p) for p in data.get("save", [])]
        return cls(**data)

    @property
    def slug(self) -> str:
        return self.key.replace("/", "-")

    @property
    def stage_keys(self) -> list[str]:
        """The manifest's stage entries this task trains: its key, or each ``experts/<domain>`` of a
        stage-2 task that trains several domains together."""
        if self.key == "experts":
            return [f"experts/{domain}" for domain in self.domains]
        return [self.key]


@dataclass
class RunContext:
    """A run folder and the resolved facts every stage needs."""

    config: object             # PipelineConfig
    run_dir: str
    data_dir: str
    base_model: str            # materialised folder
    base_sha256: str
    run_id: str
    domains: list[str]         # the composition's domains (add-domain extends it)

    def path(self, *parts) -> str:
        from pathlib import Path

        return str(Path(self.run_dir, *parts))

    def task(self, key: str, stage: str, *, domains: list[str], data_domains: list[str], stage_config,
             load=(), save=(), data_weights=None, metadata: dict | None = None) -> StageTask:
        from ..config import to_dict

        config = self.config
        use_gpu = stage_config.scaling.use_gpu
        return StageTask(
            key=key, stage=stage, method=config.method, domains=list(domains), base_model=self.base_model,
            experts=to_dict(config.experts), data_dir=self.data_dir, data_domains=list(data_domains),
            hparams=to_dict(stage_config), run_dir=self.run_dir, dtype=config.torch_dtype_name(use_gpu),
            max_length=config.data.max_length, pack=config.data.pack, seed=config.seed,
            data_weights=data_weights if data_weights is not None else stage_config.data_weights,
            load=list(load), save=list(save), after_step=json.loads(os.environ.get(AFTER_STEP_ENV) or "null"),
            validator=VALIDATOR if stage_config.validate_rows else None,
            validator_args={"split": "val", "rows": stage_config.validate_rows, "own_expert": stage == "experts"},
            metadata={"run_id": self.run_id, "stage": key, "base_model_sha256": self.base_sha256,
                      **(metadata or {})})
