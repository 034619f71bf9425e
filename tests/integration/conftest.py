"""One in-process Ray for the integration tests (4 logical CPUs on a 2-core machine)."""
import os
import uuid

import pytest


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
