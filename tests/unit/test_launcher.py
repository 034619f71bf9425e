"""A failed fit reaches the terminal as the worker's own one-line error, not Ray's "worker errors"
(no Ray cluster: Ray Train's exception objects are built by hand, fits are replaced)."""
from types import SimpleNamespace

import pytest
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from modula_ray.errors import ConfigError, StageFailedError
from modula_ray.train import launcher
from modula_ray.train.launcher import failure_cause


def test_the_lowest_failed_rank_s_own_exception_is_the_cause():
    error = WorkerGroupError("[Rank 0,1 Error Snippet]: ...", {
        1: ValueError("rank one\nwith a traceback"),
        0: ConfigError("experts.top_k", "top_k=3 must be in 1..2 (the 2 routed experts)")})
    assert str(error).startswith("Training failed due to worker errors")
    assert failure_cause(error) == ("ConfigError: experts.top_k: top_k=3 must be in 1..2 (the 2 routed experts) "
                                    "(rank 0; 1 more rank(s) failed)")
    assert failure_cause(WorkerGroupError("", {0: KeyError("tokens")})) == "KeyError: 'tokens'"


def test_a_dead_worker_and_a_controller_failure_name_what_happened():
    died = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: rank 0",
                                        failure=RuntimeError("The actor died unexpectedly before finishing this task."))
    assert failure_cause(WorkerGroupError("", {0: died})) == (
        "RuntimeError: The actor died unexpectedly before finishing this task.")
    assert failure_cause(ControllerError(OSError("storage is full"))) == "OSError: storage is full"
    assert failure_cause(RuntimeError("\n  plain\nrest")) == "RuntimeError: plain"


def test_every_failed_group_is_listed_with_its_own_cause(monkeypatch, tmp_path):
    def fit_task(task, **kwargs):
        cause = failure_cause(WorkerGroupError("", {0: ValueError(f"{task.key} broke")}))
        raise StageFailedError(f"stage {task.key} (run) failed: {cause}; worker logs: ...", cause=cause)

    monkeypatch.setattr(launcher, "fit_task", fit_task)
    jobs = [{"task": SimpleNamespace(key=key, run_dir=str(tmp_path))} for key in ("experts/math", "experts/code")]
    with pytest.raises(StageFailedError) as info:
        launcher.fit_concurrently(jobs, on_done=None)
    assert str(info.value).splitlines() == ["2 of 2 worker groups failed:",
                                            "  experts/code: ValueError: experts/code broke",
                                            "  experts/math: ValueError: experts/math broke",
                                            f"worker logs: {tmp_path / 'logs'}"]
    assert set(info.value.failures) == {"experts/math", "experts/code"}
