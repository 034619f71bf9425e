"""One Tune trial: a function trainable that builds the stage-3 ``TorchTrainer`` (Ray Train V2).

``Tuner(TorchTrainer)`` does not work under Train V2, so each trial runs ``router_trial``: it
applies its sampled hyperparameters to the run's config, builds the router task with the
pipeline's own ``train/stages/router.py`` and fits it with ``train/launcher.fit_task``, passing
``TuneReportCallback`` so every report of the Train workers (step, training loss and the
evaluation package's validation metrics) reaches Tune, where ASHA can stop the trial. No second
training loop exists for Tune.

The trial's router, its per-step TensorBoard curves and its ledger record are written into the
trial's folder, ``RUN_DIR/tune/<search>/trial_<id>/``. The Train run is named after the trial, so a
trial restarted by ``Tuner.restore`` resumes its Train run from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class TrialContext:
    """What every trial shares; passed once through ``tune.with_parameters``."""

    run: object                 # train.task.RunContext of the run folder
    spec: object                # space.SearchSpec
    search: str                 # the search's name: RUN_DIR/tune/<search>
    experiment_dir: str
    storage_path: str           # Ray Train storage of the trials' runs
    train_rows: dict            # train-split rows per data domain (data_weights multiply these)
    data_domains: list

    def config_for(self, sample: dict):
        from .space import trial_config

        return trial_config(self.run.config, self.spec, sample, self.train_rows, self.data_domains)


def trial_folder(experiment_dir, trial_id: str) -> Path:
    return Path(experiment_dir) / f"trial_{trial_id}"


def trial_dirname(trial) -> str:
    """Tune's ``trial_dirname_creator``: ``trial_<id>``, so a trial's folder is known from its id."""
    return trial_folder(".", trial.trial_id).name


def router_trial(sample: dict, context: TrialContext) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..compose import PartRef
    from ..train.task import VALIDATOR
    from ..fileio import atomic_write_json
    from ..train.launcher import fit_task
    from ..train.stages import STAGE_TASKS

    trial_id = ray.tune.get_context().get_trial_id()
    folder = trial_folder(context.experiment_dir, trial_id)
    config = context.config_for(sample)
    run = dataclasses.replace(context.run, config=config)
    task = STAGE_TASKS["router"](run, run.domains)[0]
    task = dataclasses.replace(
        task, key=f"tune/{trial_id}", save=[PartRef("router", str(folder / "router"))],
        tensorboard_dir=str(folder / "steps"), validator=VALIDATOR,
        validator_args=context.spec.validation.validator_args(),
        metadata={**task.metadata, "tune": {"search": context.search, "trial": trial_id, "sample": sample}})
    record, _ = fit_task(task, config.stage("router").scaling, run_name=f"modula-{run.run_id}-tune-{context.search}-"
                         f"{trial_id}", storage_path=context.storage_path, max_failures=config.max_failures,
                         event=f"tune:{context.search}", callbacks=[TuneReportCallback()])
    atomic_write_json(folder / "ledger.json", record)
