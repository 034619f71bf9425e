"""The tiny pipeline end to end on a real in-process Ray: three stages, stage 2 concurrent,
manifest and ledger, re-runs, add-domain, the molora baseline and the cost comparison."""
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modula_ray.compose import load_composition, read_manifest
from modula_ray.config import PipelineConfig, load_config
from modula_ray.experts import routing_weights
from modula_ray.train.ledger import overlaps
from modula_ray.train.pipeline import add_domain, run_pipeline

pytestmark = pytest.mark.slow
TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"
LEDGER_KEYS = {"stage", "domain", "trainable_params", "tokens", "flops", "wall_s", "worker_s", "peak_mem_mb",
               "started_at", "ended_at"}
# Final losses of the tiny config (random tiny Llama, seed 0, 8 steps per stage); CPU-deterministic.
PINNED_LOSS = {"universal": 6.2056, "math": 6.0952, "code": 6.1747, "router": 6.1743}


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    manifest = run_pipeline(load_config(PipelineConfig, TINY), run_dir, command="pytest tiny")
    return run_dir, manifest


def test_manifest_records_every_part(tiny_run):
    run_dir, manifest = tiny_run
    assert manifest["method"] == "modula_res"
    assert list(manifest["domains"]) == ["math", "code"]
    datasets = json.loads((run_dir / "data" / "datasets.json").read_text())
    for domain in ("math", "code"):
        entry = manifest["domains"][domain]
        assert entry["path"] == f"experts/{domain}" and (run_dir / entry["path"] / "adapter.safetensors").is_file()
        assert entry["data_sha256"] == datasets["domains"][domain]["splits"]["train"]["sha256"]
        assert entry["metrics"]["loss"] == pytest.approx(PINNED_LOSS[domain], abs=2e-3)
    assert manifest["universal"]["path"] == "universal"
    assert manifest["universal"]["metrics"]["loss"] == pytest.approx(PINNED_LOSS["universal"], abs=2e-3)
    assert manifest["router"]["path"] == "router" and manifest["router"]["routed"] == ["math", "code"]
    assert manifest["router"]["hyperparameters"]["aux_loss_coef"] == 0.01
    assert manifest["router"]["metrics"]["loss"] == pytest.approx(PINNED_LOSS["router"], abs=2e-3)
    assert len(manifest["base_model"]["sha256"]) == 64
    assert (run_dir / "config.yaml").read_text().startswith("# pytest tiny\n")


def test_ledger_has_a_record_per_stage_and_expert_and_stage2_overlaps(tiny_run):
    _, manifest = tiny_run
    ledger = manifest["ledger"]
    assert [(r["stage"], r["domain"]) for r in ledger if r["stage"] != "experts"] == [("universal", None),
                                                                                     ("router", None)]
    experts = {r["domain"]: r for r in ledger if r["stage"] == "experts"}
    assert set(experts) == {"math", "code"}
    for record in ledger:
        assert LEDGER_KEYS <= set(record)
        assert record["flops"] >= 4 * record["tokens"] * record["trainable_params"] > 0
        assert record["worker_s"] == pytest.approx(record["wall_s"] * record["num_workers"], rel=1e-6)
        assert record["ended_at"] > record["started_at"] and record["peak_mem_mb"] > 0
    assert experts["math"]["trainable_params"] == experts["code"]["trainable_params"]
    universal = next(r for r in ledger if r["stage"] == "universal")
    assert universal["trainable_params"] == 2 * experts["math"]["trainable_params"]  # r_u = 2 r_d, same shapes
    assert overlaps(experts["math"], experts["code"]), "stage-2 trainers did not run concurrently"


def test_composition_loads_and_routes(tiny_run):
    run_dir, _ = tiny_run
    model, tokenizer = load_composition(run_dir)
    ids = tokenizer("What is 3 + 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    weights = routing_weights(model)
    assert list(weights) == ["math", "code"] and sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(logits).all()
    for sub in ("universal", "experts-math", "experts-code", "router"):
        assert list((run_dir / "tensorboard" / sub).glob("events.out.tfevents.*")), sub


def test_rerun_does_nothing_unless_forced(tiny_run):
    run_dir, manifest = tiny_run
    before = digests(run_dir / "experts") | digests(run_dir / "universal") | digests(run_dir / "router")
    started = time.perf_counter()
    again = run_pipeline(load_config(PipelineConfig, TINY), run_dir, command="pytest tiny")
    assert time.perf_counter() - started < 30
    assert len(again["ledger"]) == len(manifest["ledger"])
    assert (digests(run_dir / "experts") | digests(run_dir / "universal") | digests(run_dir / "router")) == before


@pytest.fixture(scope="module")
def added(tiny_run, tmp_path_factory):
    source, _ = tiny_run
    run_dir = tmp_path_factory.mktemp("runs") / "added"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("ray"))
    before = {name: digests(run_dir / name) for name in ("universal", "experts/math", "experts/code")}
    manifest = add_domain("finance", run_dir)
    return run_dir, manifest, before


def test_add_domain_keeps_existing_experts_byte_identical(added):
    run_dir, manifest, before = added
    for name, files in before.items():
        assert digests(run_dir / name) == files, f"{name} changed"
    assert list(manifest["domains"]) == ["math", "code", "finance"]
    assert manifest["router"]["routed"] == ["math", "code", "finance"]
    event = [r for r in manifest["ledger"] if r["event"] == "add-domain:finance"]
    assert [(r["stage"], r["domain"]) for r in event] == [("experts", "finance"), ("router", None)]
    assert load_config(PipelineConfig, run_dir / "config.yaml").domains == ["math", "code", "finance"]
    model, _ = load_composition(run_dir)
    assert model.model.layers[0].self_attn.q_proj.domain.A.shape[0] == 3
    with pytest.raises(ValueError, match="already in the composition"):
        add_domain("finance", run_dir)


def test_molora_add_domain_retrains_all_and_cost_compares(added, ray_local, tmp_path):
    modula_dir, _, _ = added
    config = load_config(PipelineConfig, TINY, ["method=molora"])
    molora_dir = tmp_path / "molora"
    run_pipeline(config, molora_dir, command="pytest molora")
    before = digests(molora_dir / "experts")
    manifest = add_domain("finance", molora_dir)
    after = digests(molora_dir / "experts")
    for name in ("math/adapter.safetensors", "code/adapter.safetensors"):
        assert after[name] != before[name], "molora must retrain every expert"
    event = [r for r in manifest["ledger"] if r["event"] == "add-domain:finance"]
    assert [(r["stage"], r["domain"]) for r in event] == [("joint", None)]

    out = subprocess.run([sys.executable, "-m", "modula_ray.cli", "cost", str(modula_dir), "--against",
                          str(molora_dir), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    ratio = report["ratios"]["params_x_tokens_ratio"]
    mine, theirs = report["add_domain"], report["baseline"]
    assert mine["params_x_tokens"] == sum(r["trainable_params"] * r["tokens"] for r in
                                          read_manifest(modula_dir)["ledger"] if r["event"] == "add-domain:finance")
    assert 0 < ratio < 1, "adding a domain to MoDULA must cost less than retraining molora"
    assert report["ratios"]["worker_ratio"] > 0 and report["ratios"]["wall_ratio"] > 0
    text = subprocess.run([sys.executable, "-m", "modula_ray.cli", "cost", str(modula_dir), "--against",
                           str(molora_dir)], capture_output=True, text=True, timeout=120).stdout
    assert "pluggability (params x tokens) ratio" in text and "worker-second ratio" in text


def test_lora_baseline_is_one_joint_stage(ray_local, tmp_path):
    manifest = run_pipeline(load_config(PipelineConfig, TINY, ["method=lora"]), tmp_path / "lora")
    assert [(r["stage"], r["domain"], r["event"]) for r in manifest["ledger"]] == [("joint", None, "pipeline")]
    assert manifest["universal"]["path"] == "universal" and manifest["router"] is None
    assert list(manifest["domains"]) == ["math", "code"]
    assert all(entry["path"] is None and len(entry["data_sha256"]) == 64 for entry in manifest["domains"].values())
    assert manifest["ledger"][0]["trainable_params"] == 16384  # rank 8 on all 7 projections of 2 blocks
    model, tokenizer = load_composition(tmp_path / "lora")
    assert routing_weights(model(tokenizer("12 + 3", return_tensors="pt").input_ids) and model) == {}
