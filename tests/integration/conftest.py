"""One in-process Ray for the integration tests (4 logical CPUs on a 2-core machine), and the tiny
pipeline's run that several modules share."""
import os
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
