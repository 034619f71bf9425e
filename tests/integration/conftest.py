"""One in-process Ray for the integration tests (4 logical CPUs on a 2-core machine), and the tiny
pipeline's run that several modules share."""
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"
# Stage 2 trains long enough (about 5 s) that "the two groups trained at the same time" means something.
CONCURRENT = ["stages.experts.steps=60", "stages.experts.log_every=20", "stages.experts.checkpoint_every=30"]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def run_name(request):
    """Unique per test run: Ray Train V2 silently resumes a reused name."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """``(run_dir, manifest)`` of the tiny pipeline (3 stages, 2 domains). Copy it before changing it."""
    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.train.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    manifest = run_pipeline(load_config(PipelineConfig, TINY, CONCURRENT), run_dir, command="pytest tiny")
    return run_dir, manifest


# The tiny model's 2 layers as two MoDE blocks of one layer; stage 2 long enough to overlap (CONCURRENT).
MODE = ["method=mode", "experts.mode_blocks=[[0, 1], [1, 2]]", "stages.joint.steps=6", "stages.router.steps=6",
        *CONCURRENT]


@pytest.fixture(scope="session")
def mode_run(ray_local, tmp_path_factory):
    """``(run_dir, manifest)`` of the tiny pipeline with ``method: mode`` (experts, then joint)."""
    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.train.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("runs") / "mode"
    return run_dir, run_pipeline(load_config(PipelineConfig, TINY, MODE), run_dir, command="pytest tiny mode")


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("ray"))
    return target


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def added(tiny_run, tmp_path_factory):
    """``(run_dir, manifest, digests before)``: a copy of the tiny run after ``add_domain("finance")``."""
    from modula_ray.train.pipeline import add_domain

    run_dir = copy_run(tiny_run[0], tmp_path_factory.mktemp("runs") / "added")
    before = {name: digests(run_dir / name) for name in ("universal", "experts/math", "experts/code")}
    return run_dir, add_domain("finance", run_dir), before


# -- Serve on 127.0.0.1: shared by test_serve*.py -------------------------------------------------
ADMIN_TOKEN, API_KEY = "admin-secret", "user-key"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, path: str, body=None, *, raw: bytes | None = None, token: str | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    """One request with a timeout; ``(status, JSON body)`` whatever the status."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="session")
def served(ray_local, tiny_run, tmp_path_factory):
    """Two Serve applications on one free port:

    - ``/``: the tiny run (``tiny``), a copy of it under a hot-plug root (``hot``) and the base model
      alone (``tiny-llama``), with an admin token;
    - ``/tight``: the tiny run with an API key and small limits (batch 2, queue 2, 1.5 s, 4 KiB);
    - ``/pair``: ``hot`` again on two replicas, which follow a hot-plug made through ``/``.
    """
    from types import SimpleNamespace

    from ray import serve

    from modula_ray.serve.app import build_app

    roots = tmp_path_factory.mktemp("served")
    hot = copy_run(tiny_run[0], roots / "hot")
    outside = copy_run(tiny_run[0], tmp_path_factory.mktemp("elsewhere") / "outside")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0.5}}  # room for add_domain's Train workers beside them
    serve.run(build_app([tiny_run[0], hot], base_models=["tiny-llama"], admin_token=ADMIN_TOKEN,
                        admin_roots=[str(roots)], deployment=small), name="main", route_prefix="/")
    serve.run(build_app([tiny_run[0]], api_key=API_KEY, max_batch_size=2, max_queued_requests=2,
                        request_timeout_s=1.5, max_body_bytes=4096, deployment=small), name="tight",
              route_prefix="/tight")
    serve.run(build_app([hot], deployment={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}),
              name="pair", route_prefix="/pair")
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", name=tiny_run[0].name, hot=hot, outside=outside,
                              tight=f"http://127.0.0.1:{port}/tight", pair=f"http://127.0.0.1:{port}/pair")
    finally:
        serve.shutdown()
