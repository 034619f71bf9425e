"""Shared test setup: offline hubs, GPU marker, small real models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


# ``make test`` runs two pytest-xdist workers (``pytest -n 2``), each with its own in-process Ray.
# One takes, in file order, the integration modules that share the session's runs (the tiny run, the
# tiny experiment, the Serve applications over them), so each is built once; the other takes the
# integration modules whose runs are their own (a 2-node cluster, kill-and-resume, DDP and DeepSpeed,
# MoDE, Ray Data, a wheel's venv). The unit tests go to whichever is free. (xdist's ``--dist
# loadgroup`` cannot do this under pytest 9: it renames ``item._nodeid``, which pytest 9 no longer reads.)
SHARED_RUNS = {"test_eval.py", "test_experiment.py", "test_pipeline.py", "test_serve.py", "test_serve_judges.py",
               "test_serve_ops.py", "test_tune.py"}


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: one of the two integration groups, or the test itself."""
    path = nodeid.split("::", 1)[0]
    if not path.startswith("tests/integration/"):
        return nodeid
    return "shared-runs" if path.rsplit("/", 1)[1] in SHARED_RUNS else "own-runs"


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class TwoGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return TwoGroups(config, log)


def pytest_collection_modifyitems(config, items):
    """Every test under ``tests/integration`` is ``slow`` (it runs on Ray, a subprocess or a server;
    ``make test-fast`` deselects them); ``gpu`` tests are skipped without CUDA."""
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)
        if skip and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): random Llama, hidden 64, 2 layers. Do not mutate: use tiny_fresh."""
    from modula_ray.models import tiny_model

    return tiny_model()


@pytest.fixture
def tiny_fresh():
    from modula_ray.models import tiny_model

    return tiny_model()
