"""Run ``StageTask``s as ``TorchTrainer``s: one at a time, or several at once from threads.

Each trainer gets its own ``ScalingConfig`` (worker group), a run name unique to the run
folder (Ray Train V2 silently resumes a reused name, which we want only for the same
attempt of the same stage), ``FailureConfig(max_failures)`` and the split as a Ray Dataset.
Every worker sees the whole split (no Ray Data split) so the data order, and resume, are exact.
The workers' output goes to ``RUN_DIR/logs/``; ``ProgressTail`` echoes their ``[stage]`` progress
lines to the driver's terminal. A failed fit raises ``StageFailedError`` whose first line carries the
worker's own exception (``failure_cause``), not only Ray's "Training failed due to worker errors".
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import StageFailedError
from ..ray_session import OFFLINE_ENV
from .ledger import make_record
from .deepspeed_ops import extensions_dir
from .task import StageTask

# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train V2 otherwise logs every worker print() twice.
WORKER_ENV = {**OFFLINE_ENV, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def worker_env() -> dict:
    return {**WORKER_ENV, "MODULA_RAY_CACHE": str(extensions_dir().parent), "TORCH_EXTENSIONS_DIR": str(extensions_dir())}


class ProgressTail:
    """Echo the ``[key] ...`` lines of the rank-0 worker log to this terminal while a fit runs."""

    def __init__(self, task: StageTask, interval: float = 0.5):
        self.path = Path(task.run_dir) / "logs" / f"{task.slug}.rank0.log"
        self.prefix, self.interval = f"[{task.key}]", interval
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"tail-{task.slug}", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        self._echo()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._echo()

    def _echo(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk.rfind(b"\n") + 1
        self.offset += complete
        for line in chunk[:complete].decode(errors="replace").splitlines():
            if line.startswith(self.prefix):
                print(line, flush=True)


def _one_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failure_cause(exc: BaseException) -> str:
    """``Type: first line of the message`` of what made a fit fail. Ray Train's ``WorkerGroupError``
    carries each failed rank's own exception in ``worker_failures`` (the lowest rank's is shown, with
    how many more failed), its ``ControllerError`` the controller's in ``controller_failure``, and a
    worker that died (``WorkerHealthCheckFailedError``) what the health check met there."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank = min(failures)
        more = f" (rank {rank}; {len(failures) - 1} more rank(s) failed)" if len(failures) > 1 else ""
        return failure_cause(failures[rank]) + more
    for inner in ("controller_failure", "health_check_failure"):
        if isinstance(getattr(exc, inner, None), BaseException):
            return failure_cause(getattr(exc, inner))
    return _one_line(exc)


def phases_note(record: dict) -> str:
    """`` (Ray 14.0 s, imports 1.1 s, setup 2.9 s)``: where the start-up went (ledger.py)."""
    phases = record.get("startup_phases")
    if not phases:
        return ""
    return f" (Ray {phases['ray_s']:.1f}s, imports {phases['imports_s']:.1f}s, setup {phases['setup_s']:.1f}s)"


def fit_task(task: StageTask, spec, *, run_name: str, storage_path: str, max_failures: int, event: str,
             callbacks: list | None = None):
    """Train one task; returns ``(ledger record, final metrics)``. ``callbacks``: Ray Train
    ``UserCallback``s, e.g. Tune's ``TuneReportCallback`` when a Tune trial runs the task."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..data.ray_data import mixed_ray_dataset
    from .loop import train_loop_per_worker

    ray.data.DataContext.get_current().enable_progress_bars = False  # one log line per stage instead
    dataset = mixed_ray_dataset(task.data_dir, task.data_domains, "train", task.data_weights, seed=task.seed)
    scaling = ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                            resources_per_worker=spec.resources_per_worker, accelerator_type=spec.accelerator_type,
                            label_selector=spec.node_labels)
    run_config = RunConfig(name=run_name, storage_path=storage_path,
                           failure_config=FailureConfig(max_failures=max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2),
                           worker_runtime_env={"env_vars": worker_env()}, callbacks=callbacks or [],
                           logging_config=LoggingConfig(log_level="WARNING"))  # our own log line per step
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"task": task.to_dict()},
                           scaling_config=scaling, run_config=run_config, datasets={"train": dataset},
                           dataset_config=DataConfig(datasets_to_split=[]))
    print(f"[{task.key}] starting {spec.num_workers} worker(s) x {spec.worker_resources()} as {run_name}",
          flush=True)
    started = time.time()
    try:
        with ProgressTail(task):
            result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray raises several failure types
        cause = failure_cause(exc)
        raise StageFailedError(f"stage {task.key} ({run_name}) failed: {cause}; worker logs: "
                               f"{Path(task.run_dir) / 'logs'}", cause=cause) from exc
    ended = time.time()
    if result.error is not None or not (result.metrics or {}).get("final_report"):
        cause = failure_cause(result.error) if result.error is not None else "no final report"
        raise StageFailedError(f"stage {task.key} ({run_name}) failed: {cause}", cause=cause)
    metrics = dict(result.metrics)
    stage, _, domain = task.key.partition("/")
    record = make_record(stage=stage, domain=domain or None, event=event, metrics=metrics, spec=spec,
                         fit_started_at=started, fit_ended_at=ended, run_name=run_name)
    if len(task.stage_keys) > 1:  # stage 2 together: one record for the group, its domains named
        record["domains"] = list(task.domains)
    print(f"[{task.key}] done: loss {metrics['first_loss']:.4f} -> {metrics['loss']:.4f}, {metrics['tokens']:,} "
          f"tokens in {record['train_s']:.1f}s of training ({record['tokens_per_s']:,.0f} tok/s) after "
          f"{record['startup_s']:.1f}s of start-up{phases_note(record)}, {metrics['trainable_params']:,} trainable "
          f"params", flush=True)
    return record, metrics


def fit_concurrently(jobs: list[dict], on_done) -> None:
    """Fit every job (``fit_task`` kwargs) at once; ``on_done(job, record, metrics)`` runs as each
    finishes (serialised), so one failure does not lose the others. Raises one ``StageFailedError``
    that names every failed group (``.failures``: ``{stage key: exception}``)."""
    lock, failures = threading.Lock(), {}

    def run(job):
        try:
            record, metrics = fit_task(**job)
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below
            with lock:
                failures[job["task"].key] = exc
            return
        with lock:
            on_done(job, record, metrics)

    with ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="stage") as pool:
        list(pool.map(run, jobs))
    if len(failures) == 1:
        raise next(iter(failures.values()))
    if failures:
        error = StageFailedError(f"{len(failures)} of {len(jobs)} worker groups failed:\n" + "\n".join(
            f"  {key}: {getattr(exc, 'cause', None) or _one_line(exc)}" for key, exc in sorted(failures.items()))
            + f"\nworker logs: {Path(jobs[0]['task'].run_dir) / 'logs'}")
        error.failures = failures
        raise error


def default_storage(run_dir: str) -> str:
    return str(Path(run_dir).resolve() / "ray")
