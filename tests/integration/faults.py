"""Hooks (``modula_ray/hooks.py``) that tests set where the product runs. Ray imports this module in
the worker or replica, from the driver's working directory (the repo root).

- ``crash(monkeypatch, stage, step)`` makes the trainers started afterwards call ``crash_once``
  after every optimizer step (``StageTask.after_step``) in their workers;
- ``fail_decode_once`` and ``record_batch`` are a Serve app's ``decode_hook``, called with the rows
  that join the running batch in one step: the first fails that step (the replica is then broken),
  the second logs which prompts joined together."""
import json
import os
import time
from pathlib import Path

from modula_ray.train.task import AFTER_STEP_ENV


def crash_once(state, *, stage: str, step: int, run_dir: str | None = None) -> None:
    """Rank 0 of ``stage`` (a task key, or its prefix before ``/``) exits hard after ``step``, once per
    run folder (only in ``run_dir`` if given): the marker ``RUN_DIR/.crashed-<slug>-step<step>`` stops
    the retry from dying again."""
    task = state.task
    if state.rank != 0 or state.step != step or task.key.partition("/")[0] != stage:
        return
    if run_dir is not None and Path(task.run_dir).resolve() != Path(run_dir).resolve():
        return
    marker = Path(task.run_dir) / f".crashed-{task.slug}-step{step}"
    if marker.exists():
        return
    marker.touch()
    # Ray Train's controller collects reports (and registers checkpoints) once per health check; die only
    # after the last checkpoint had one, as a real crash later would.
    time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0)
    os._exit(1)


def crash(monkeypatch, stage: str, step: int, run_dir=None) -> None:
    """Every task built from now on in this test (in ``run_dir`` alone, if given) crashes rank 0 of
    ``stage`` once, after ``step``."""
    monkeypatch.setenv(AFTER_STEP_ENV, json.dumps({"call": f"{__name__}:crash_once", "stage": stage, "step": step,
                                                   "run_dir": None if run_dir is None else str(run_dir)}))


def fail_decode_once(requests, *, marker: str) -> None:
    """Fail the first batch a replica decodes after ``marker`` is written (then never again)."""
    if not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        raise RuntimeError("injected decode failure")


def record_batch(requests, *, path: str) -> None:
    """Append one JSON line per batch: the prompt token ids of its requests."""
    with open(path, "a") as log:
        log.write(json.dumps([request.prompt_ids for request in requests]) + "\n")
