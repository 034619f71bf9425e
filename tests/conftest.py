"""Shared test setup: offline hubs, GPU marker, small real models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


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
