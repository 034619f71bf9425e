"""MoDE through the same machinery as every method: the tiny pipeline with ``method: mode``
(stage 2 on two worker groups at once, then joint), add-domain with the old experts byte-identical,
and ``--model modula`` in lm-eval. Serving it: test_serve.py."""
import pytest
import torch

from tests.integration.conftest import copy_run, digests

pytestmark = pytest.mark.slow


def test_the_tiny_pipeline_runs_mode(mode_run):
    from modula_ray.compose import load_composition
    from modula_ray.models import load_base
    from modula_ray.train.ledger import overlaps
    from tests.helpers import ids

    run_dir, manifest = mode_run
    assert manifest["method"] == "mode" and list(manifest["domains"]) == ["math", "code"]
    assert manifest["router"]["routed"] == ["backbone", "math", "code"] and manifest["universal"] is None
    records = {r["stage"] + (f"/{r['domain']}" if r["domain"] else ""): r for r in manifest["ledger"]}
    assert set(records) == {"experts/math", "experts/code", "joint"}
    assert overlaps(records["experts/math"], records["experts/code"])  # two worker groups at once
    # stage 2 trains one full copy of each block's layers; joint trains both experts and the gates
    base, tokenizer = load_base("tiny-llama")
    layer_params = sum(p.numel() for p in base.model.layers.parameters())
    assert records["experts/math"]["trainable_params"] == layer_params
    assert records["joint"]["trainable_params"] == 2 * layer_params + 2 * 3 * 64
    model, _ = load_composition(run_dir)
    with torch.no_grad():
        assert not torch.allclose(model(ids(tokenizer)).logits, base(ids(tokenizer)).logits)


def test_add_domain_keeps_the_old_experts_byte_identical(mode_run, tmp_path):
    from modula_ray.train.pipeline import add_domain

    run_dir = copy_run(mode_run[0], tmp_path / "run")
    before = {name: digests(run_dir / name) for name in ("experts/math", "experts/code")}
    manifest = add_domain("finance", run_dir)
    assert {name: digests(run_dir / name) for name in before} == before
    assert list(manifest["domains"]) == ["math", "code", "finance"]
    assert manifest["router"]["routed"] == ["backbone", "math", "code", "finance"]
    added = [r for r in manifest["ledger"] if r["event"] == "add-domain:finance"]
    assert [(r["stage"], r["domain"]) for r in added] == [("experts", "finance"), ("router", None)]
    assert added[1]["trainable_params"] == 2 * 4 * 64  # the gates alone: 2 blocks x (backbone + 3) x d


def test_lm_eval_evaluates_mode(mode_run):
    """``--model modula`` over a MoDE run scores what lm-eval's own HFLM scores over
    ``load_composition``, and not what the base model alone scores."""
    from tests.integration.test_eval import loss_of

    loss_of(mode_run[0])


def test_tune_searches_the_gates_as_the_router(mode_run, tmp_path):
    import yaml

    from modula_ray.tune.search import tune_router

    run_dir = copy_run(mode_run[0], tmp_path / "run")
    experts = {name: digests(run_dir / name) for name in ("experts/math", "experts/code")}
    space = tmp_path / "space.yaml"
    space.write_text("# modula-ray tune router --run RUN --space space.yaml\n" + yaml.safe_dump({
        "search": {"num_samples": 1, "max_concurrent": 1}, "scheduler": {"name": "fifo"},
        "validation": {"rows": 2, "every": 3},
        "trial": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "torch_threads": 1},
        "space": {"lr": {"choice": [0.01, 0.05]}, "top_k": {"choice": [None, 2]}}}))
    out = tune_router(run_dir, space)
    router = out["manifest"]["router"]
    assert router["routed"] == ["backbone", "math", "code"] and router["tuned"]["completed"] == 1
    assert 0 <= out["best"]["routing_accuracy"] <= 1
    assert {name: digests(run_dir / name) for name in experts} == experts  # only the gates moved
