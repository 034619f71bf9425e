"""The one Ray set-up (modula_ray/ray_session.py) without starting Ray: ``ray.init`` is replaced by a
recorder. The offline environment is spelled once and every runtime environment carries it; the
RAY_ADDRESS forms (none, GCS, dashboard) reach ``ray.init`` as DESIGN §6 says; with a run folder
the raylet's warnings go to driver.log. Real joins: tests/integration/test_cluster.py."""
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from modula_ray import ray_session
from modula_ray.ray_session import GCS_ENV, OFFLINE_ENV, ClusterAddressError, connect_ray

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = "127.0.0.1:8265"


def test_the_offline_environment_is_spelled_once():
    sources = [*(ROOT / "modula_ray").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]
    spelled = sorted(str(path.relative_to(ROOT)) for path in sources
                     if any(name in path.read_text() for name in OFFLINE_ENV))
    assert spelled == ["modula_ray/ray_session.py"]


def test_every_runtime_environment_carries_the_offline_environment():
    """Ray Train's workers (from the one definition), and the files that cannot import it: the job
    runtime env, the Serve config, the KubeRay job, the Makefile and the local cluster's nodes."""
    from modula_ray.train.launcher import worker_env

    def read(path):
        return (ROOT / path).read_text()

    serve, rayjob = yaml.safe_load(read("cluster/serve.yaml")), yaml.safe_load(read("cluster/kuberay/rayjob.yaml"))
    local = next(line for line in read("cluster/local.sh").splitlines() if line.startswith("export HF_HUB_OFFLINE"))
    environments = {"launcher.worker_env()": worker_env(),
                    "cluster/runtime_env.yaml": yaml.safe_load(read("cluster/runtime_env.yaml"))["env_vars"],
                    "cluster/kuberay/rayjob.yaml": yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"],
                    "Makefile": dict(re.findall(r"^export (\w+) := (\S+)", read("Makefile"), re.M)),
                    "cluster/local.sh": dict(re.findall(r"(\w+)=(\S+)", local)),
                    **{f"cluster/serve.yaml {app['name']}": app["runtime_env"]["env_vars"]
                       for app in serve["applications"]}}
    for where, env in environments.items():
        assert {name: str(env.get(name)) for name in OFFLINE_ENV} == OFFLINE_ENV, where


@pytest.fixture
def clean_env(monkeypatch):
    """No RAY_ADDRESS, GCS address or offline variables; whatever connect_ray sets is undone."""
    for name in ("RAY_ADDRESS", GCS_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", *OFFLINE_ENV):
        monkeypatch.setenv(name, "")  # records the original, so the teardown restores it
        monkeypatch.delenv(name)
    return monkeypatch


def test_offline_environment_keeps_what_the_caller_set(clean_env):
    clean_env.setenv("HF_HUB_OFFLINE", "0")
    ray_session.use_offline_env()
    assert {name: os.environ[name] for name in OFFLINE_ENV} == {**OFFLINE_ENV, "HF_HUB_OFFLINE": "0"}


def test_the_cli_sets_the_offline_environment_before_any_command(clean_env):
    from modula_ray.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert {name: os.environ[name] for name in OFFLINE_ENV} == OFFLINE_ENV


class FakeRay:
    """``ray.init`` / ``is_initialized`` / ``shutdown`` that record, and answer as told."""

    def __init__(self, monkeypatch, *, dashboard_url=DASHBOARD, error=None, initialized=False):
        import ray

        self.calls, self.shutdowns = [], 0
        self.dashboard_url, self.error, self.initialized = dashboard_url, error, initialized
        monkeypatch.setattr(ray, "init", self.init)
        monkeypatch.setattr(ray, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(ray, "shutdown", self.shutdown)

    def init(self, address=None, **options):
        self.calls.append({"address": address, **options, "environ": dict(os.environ)})
        if self.error is not None:
            raise self.error
        return SimpleNamespace(dashboard_url=self.dashboard_url)

    def shutdown(self):
        self.shutdowns += 1


def test_no_ray_address_starts_an_in_process_ray_in_the_offline_environment(clean_env, capsys):
    fake = FakeRay(clean_env)
    clean_env.setenv("RAY_ADDRESS", "")  # set but empty: no cluster
    assert connect_ray(num_cpus=3) is True
    (call,) = fake.calls
    assert {k: call[k] for k in ("address", "num_cpus", "log_to_driver", "logging_level")} == {
        "address": None, "num_cpus": 3, "log_to_driver": True, "logging_level": logging.WARNING}
    environ = call["environ"]  # what an in-process Ray's workers inherit
    assert {name: environ[name] for name in OFFLINE_ENV} == OFFLINE_ENV
    assert environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert capsys.readouterr().out == (f"ray: started an in-process Ray with 3 logical CPUs on {os.cpu_count()} "
                                       f"cores, dashboard http://{DASHBOARD}\n")


def test_a_gcs_address_is_joined_as_it_is_and_num_cpus_is_left_to_the_cluster(clean_env, capsys):
    fake = FakeRay(clean_env)
    clean_env.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert connect_ray(num_cpus=3, log_to_driver=False) is True
    (call,) = fake.calls
    assert call["address"] == "10.0.0.5:6379" and "num_cpus" not in call and call["log_to_driver"] is False
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in call["environ"]
    assert capsys.readouterr().out.startswith("ray: joined the cluster at 10.0.0.5:6379, dashboard")


def test_a_dashboard_address_joins_the_gcs_address_of_the_same_cluster(clean_env):
    fake = FakeRay(clean_env)
    clean_env.setenv("RAY_ADDRESS", "http://localhost:8265")
    clean_env.setenv(GCS_ENV, "127.0.0.1:6379")
    assert connect_ray() is True
    (call,) = fake.calls
    assert call["address"] == "127.0.0.1:6379" and "RAY_ADDRESS" not in call["environ"]  # ray.init would read it
    assert os.environ["RAY_ADDRESS"] == "http://localhost:8265" and fake.shutdowns == 0


def test_a_dashboard_address_without_a_cluster_behind_it_says_what_to_do(clean_env):
    """No Ray at all on this machine ("auto" finds none). With one running: test_cluster.py."""
    fake = FakeRay(clean_env, error=ConnectionError("Could not find any running Ray instance.\nPlease start one."))
    clean_env.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    with pytest.raises(ClusterAddressError) as raised:
        connect_ray()
    assert fake.calls[0]["address"] == "auto"
    assert str(raised.value).startswith("RAY_ADDRESS=http://127.0.0.1:1 is the dashboard address that `ray job "
                                        "submit` uses, and no GCS address for that cluster was found (auto: Could "
                                        "not find any running Ray instance.); set MODULA_RAY_GCS_ADDRESS=HOST:PORT")
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"


def test_the_gcs_address_of_another_cluster_is_refused(clean_env):
    fake = FakeRay(clean_env, dashboard_url="127.0.0.1:9999")
    clean_env.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    clean_env.setenv(GCS_ENV, "127.0.0.1:6380")
    with pytest.raises(ClusterAddressError, match="127.0.0.1:6380 joined the cluster whose dashboard is "
                                                  "127.0.0.1:9999, not RAY_ADDRESS=http://127.0.0.1:8265"):
        connect_ray()
    assert fake.shutdowns == 1


def test_a_cluster_without_a_dashboard_is_not_the_one_a_dashboard_address_names(clean_env):
    """"auto" joins whatever Ray runs on this machine, e.g. an in-process one without a dashboard."""
    fake = FakeRay(clean_env, dashboard_url="")
    clean_env.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    with pytest.raises(ClusterAddressError, match=r"^auto joined a cluster without a dashboard, not "
                                                  r"RAY_ADDRESS=http://127.0.0.1:1; set MODULA_RAY_GCS_ADDRESS"):
        connect_ray()
    assert fake.calls[0]["address"] == "auto" and fake.shutdowns == 1


def test_a_ray_already_up_is_left_to_its_owner(clean_env, capsys):
    fake = FakeRay(clean_env, initialized=True)
    assert connect_ray(num_cpus=3) is False
    assert fake.calls == [] and capsys.readouterr().out == ""


@pytest.fixture
def restored_loggers():
    """send_ray_logs_to reconfigures process-wide loggers; put them back."""
    saved = {name: (logging.getLogger(name), list(logging.getLogger(name).handlers), logging.getLogger(name).level,
                    logging.getLogger(name).propagate, [h.level for h in logging.getLogger(name).handlers])
             for name in ray_session.QUIET_LOGGERS}
    yield
    logging.captureWarnings(False)
    for logger, handlers, level, propagate, levels in saved.values():
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        for handler, handler_level in zip(handlers, levels):
            handler.setLevel(handler_level)


def test_with_a_run_folder_the_raylet_warnings_go_to_driver_log(clean_env, restored_loggers, tmp_path, capsys):
    """Ray 2.60 prints the raylet's messages with a private function (see route_raylet_messages):
    warnings go to driver.log only, a dead worker's error also to the terminal."""
    from ray._private import worker

    fake = FakeRay(clean_env)
    printed = []
    clean_env.setattr(worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"]))
    assert connect_ray(tmp_path) is True
    (call,) = fake.calls
    assert call["log_to_driver"] is False and call["logging_level"] == logging.INFO
    assert capsys.readouterr().out.endswith(f"; Ray's output goes to {(tmp_path / 'logs').resolve()}\n")
    warning = "WARNING: 12 PYTHON worker processes have been started on node: n1"
    worker.print_to_stdstream({"lines": [warning, "A worker died or was killed"], "pid": "raylet", "is_err": False},
                              False)
    assert printed == [["A worker died or was killed"]]
    log = (tmp_path / "logs" / "driver.log").read_text()
    assert f"(raylet) {warning}" in log and "(raylet) A worker died or was killed" in log
