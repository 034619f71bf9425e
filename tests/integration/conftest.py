"""One in-process Ray for the integration tests (4 logical CPUs on a 2-core machine), the tiny data
built once, and the runs that several modules share: the tiny pipeline, its MoDE twin, add-domain
over a copy, and the tiny experiment (whose molora and modula_res runs are the suite's baselines)."""
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
TINY_EXPERIMENT = ROOT / "jobs" / "configs" / "tiny-experiment.yaml"
# Stage 2 trains long enough (several seconds) that "the two groups trained at the same time" means
# something (at 60 steps, 2.3 s, a clean-clone run saw start-up jitter leave them 0.9 s in common).
CONCURRENT = ["stages.experts.steps=150", "stages.experts.log_every=50", "stages.experts.checkpoint_every=75"]
_DATA: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def tiny_data(tmp_path_factory) -> Path:
    """Every domain's tiny data (size tiny, seed 0, as tiny.yaml asks), built once per pytest run.
    Runs read it in place (``data.dir``); nothing writes into it."""
    if "dir" not in _DATA:
        from modula_ray.data.build import build_datasets

        folder = tmp_path_factory.mktemp("tiny-data") / "data"
        build_datasets("tiny", 0, folder, progress=False)
        _DATA["dir"] = folder
    return _DATA["dir"]


def tiny_overrides(*overrides: str) -> list[str]:
    """``overrides`` plus the shared tiny data folder (built once by ``tiny_data``)."""
    return [f"data.dir={_DATA['dir']}", *overrides]


def tiny_config(*overrides: str):
    """``jobs/configs/tiny.yaml`` with ``overrides``, on the shared tiny data."""
    from modula_ray.config import PipelineConfig, load_config

    return load_config(PipelineConfig, TINY, tiny_overrides(*overrides))


# Test-only Ray settings (product runs keep Ray's defaults, except as ray_session.py says):
# - Ray Train's controller polls its workers every 2 s by default; a run of the tiny model trains for
#   about a second, so at 0.25 s each fit ends (and starts) seconds sooner;
# - no preemption watcher (one more actor per fit; ``init_ray`` turns it off in-process too);
# - idle workers are kept (soft limit 16, not the 4 CPUs) instead of killed after 1 s, so the next fit's
#   controller and Ray Data tasks reuse them rather than start and import into new processes. Measured
#   on tests/integration/test_pipeline.py (7 fits): 113 s -> 103 s, 181 -> 160 CPU-seconds.
TEST_RAY_ENV = {"DS_ACCELERATOR": "cpu", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_num_workers_soft_limit": "16",
                "RAY_idle_worker_killing_time_threshold_ms": "600000"}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from modula_ray.ray_session import OFFLINE_ENV

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.update(TEST_RAY_ENV)  # the raylet, and every worker it starts, inherit it
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": {**OFFLINE_ENV, **TEST_RAY_ENV}})
    yield ray
    ray.shutdown()


@pytest.fixture
def run_name(request):
    """Unique per test run: Ray Train V2 silently resumes a reused name."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """``(run_dir, manifest)`` of the tiny pipeline (3 stages, 2 domains). Copy it before changing it."""
    from modula_ray.train.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    manifest = run_pipeline(tiny_config(*CONCURRENT), run_dir, command="pytest tiny")
    return run_dir, manifest


# The tiny model's 2 layers as two MoDE blocks of one layer; stage 2 long enough to overlap (CONCURRENT).
MODE = ["method=mode", "experts.mode_blocks=[[0, 1], [1, 2]]", "stages.joint.steps=6", "stages.router.steps=6",
        *CONCURRENT]


@pytest.fixture(scope="session")
def mode_run(ray_local, tmp_path_factory):
    """``(run_dir, manifest)`` of the tiny pipeline with ``method: mode`` (experts, then joint)."""
    from modula_ray.train.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("runs") / "mode"
    return run_dir, run_pipeline(tiny_config(*MODE), run_dir, command="pytest tiny mode")


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("ray"))
    return target


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def added(experiment, tmp_path_factory):
    """``(run_dir, manifest, digests before)``: a copy of the experiment's ``modula_res+finance`` (its
    add-domain part: a copy of ``modula_res`` given finance by ``add_domain``), and the digests of the
    parts ``modula_res`` had (the run it was copied from)."""
    from modula_ray.compose import Manifest

    runs = experiment[1] / "seed0"
    run_dir = copy_run(runs / "modula_res+finance", tmp_path_factory.mktemp("runs") / "added")
    before = {name: digests(runs / "modula_res" / name) for name in ("universal", "experts/math", "experts/code")}
    return run_dir, Manifest.read(run_dir), before


JUDGED = ["--set", "eval.judge_limit=1", "--set", "eval.judge_model=tiny-llama"]  # the tiny model judges on Serve


@pytest.fixture(scope="session")
def experiment(ray_local, tmp_path_factory):
    """``(config, out, exit code, Serve actors left)`` of the tiny experiment (molora and modula_res,
    1 seed, finance added to both, 1 tuning trial, 1 judged item each). Its runs are the suite's
    molora baseline too. It starts and stops the judge's Serve, so it runs before ``served``."""
    import ray

    from modula_ray.cli import main

    out = tmp_path_factory.mktemp("experiment") / "out"
    code = main(["experiment", "paper", "--config", str(TINY_EXPERIMENT), "--out", str(out), *JUDGED])
    serve_left = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE" in a["name"]]
    return TINY_EXPERIMENT, out, code, serve_left


# -- Serve on 127.0.0.1: shared by test_serve*.py -------------------------------------------------
ADMIN_TOKEN, API_KEY = "admin-secret", "user-key"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, path: str, body=None, *, raw: bytes | None = None, token: str | None = None,
         timeout: float = 60) -> tuple[int, dict | str]:
    """One request with a timeout; ``(status, JSON body)`` whatever the status, or the body's text where
    it is not JSON (Serve's proxy answers 404 in plain text until an application's routes are up)."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload.decode(errors="replace")


@pytest.fixture(scope="session")
def served(ray_local, tiny_run, experiment, tmp_path_factory):
    """Three Serve applications on one free port:

    - ``/``: the tiny run (``tiny``), a copy of it under a hot-plug root (``hot``), a second copy that
      only the hot-plug test changes (``plug``) and the base model alone (``tiny-llama``), with an
      admin token; it logs the prompts of each batch to ``batches``;
    - ``/tight``: the tiny run with an API key and small limits (batch 2, queue 2, 1.5 s, 4 KiB);
    - ``/pair``: ``plug`` again on two replicas, which follow a hot-plug made through ``/``.
    """
    from types import SimpleNamespace

    from ray import serve

    from modula_ray.serve.app import build_app

    roots = tmp_path_factory.mktemp("served")
    hot, plug = copy_run(tiny_run[0], roots / "hot"), copy_run(tiny_run[0], roots / "plug")
    outside = copy_run(tiny_run[0], tmp_path_factory.mktemp("elsewhere") / "outside")
    port = free_port()
    serve.shutdown()  # Serve as an earlier test left it (chat-tour keeps a Ray it joined serving) goes first
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0.5}}  # room for add_domain's Train workers beside them
    # room for every model here and the admin test's failed plug, whose load would evict one (LRU)
    batches = roots / "batches.jsonl"  # which prompts shared each batch of the main app
    serve.run(build_app([tiny_run[0], hot, plug], base_models=["tiny-llama"], admin_token=ADMIN_TOKEN,
                        admin_roots=[str(roots)], max_models_per_replica=8, deployment=small,
                        decode_hook={"call": "tests.integration.faults:record_batch", "path": str(batches)}),
              name="main", route_prefix="/")
    serve.run(build_app([tiny_run[0]], api_key=API_KEY, max_batch_size=2, max_queued_requests=2,
                        request_timeout_s=1.5, max_body_bytes=4096, deployment=small), name="tight",
              route_prefix="/tight")
    serve.run(build_app([plug], admin_token=ADMIN_TOKEN,  # replicas follow only plugs signed with their token
                        deployment={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}),
              name="pair", route_prefix="/pair")
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", name=tiny_run[0].name, hot=hot, plug=plug, outside=outside,
                              batches=batches,
                              tight=f"http://127.0.0.1:{port}/tight", pair=f"http://127.0.0.1:{port}/pair")
    finally:
        serve.shutdown()
