"""The tiny pipeline end to end on a real in-process Ray: three stages, stage 2 concurrent,
manifest and ledger, the routing table, re-runs, lineage checks, add-domain, the molora baseline
and the cost comparison."""
import json
import subprocess
import sys
import time

import pytest
import torch

from modula_ray.compose import load_composition, read_manifest
from modula_ray.config import PipelineConfig, load_config
from modula_ray.errors import ArtifactError, StageFailedError
from modula_ray.experts import inject, routing_weights, save_part
from modula_ray.models import load_base
from modula_ray.train.ledger import overlaps
from modula_ray.train.pipeline import add_domain, run_pipeline, run_stage
from tests.helpers import randomise_experts
from tests.integration.conftest import CONCURRENT, TINY, copy_run, digests
from tests.integration.test_eval import loss_of

pytestmark = pytest.mark.slow
LEDGER_KEYS = {"stage", "domain", "trainable_params", "forward_params", "tokens", "flops", "fit_started_at",
               "fit_ended_at", "train_started_at", "train_ended_at", "train_s", "startup_s", "resource_s",
               "peak_mem_mb", "first_loss", "final_loss", "resumed_from_step", "engine", "nodes"}
# Final losses of the tiny config with CONCURRENT (random tiny Llama, seed 0); CPU-deterministic.
PINNED_LOSS = {"universal": 6.2056, "math": 5.8523, "code": 5.9356, "router": 5.9898}


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
        assert LEDGER_KEYS <= set(record), LEDGER_KEYS - set(record)
        assert record["flops"] == (4 * record["forward_params"] + 2 * record["trainable_params"]) * record["tokens"]
        assert record["fit_started_at"] < record["train_started_at"] < record["train_ended_at"] < record[
            "fit_ended_at"], "the training window lies inside the fit() call"
        assert record["startup_s"] == pytest.approx(record["train_started_at"] - record["fit_started_at"], abs=2e-3)
        assert record["resource_s"] == pytest.approx(record["train_s"] * 1 * 0.5, abs=2e-3)  # 1 worker x 0.5 CPU
        assert record["resumed_from_step"] is None and record["engine"] == "torch" and record["peak_mem_mb"] > 0
    assert experts["math"]["trainable_params"] == experts["code"]["trainable_params"]
    universal = next(r for r in ledger if r["stage"] == "universal")
    assert universal["trainable_params"] == 2 * experts["math"]["trainable_params"]  # r_u = 2 r_d, same shapes
    # stage 1 runs no domain expert and no router; stage 2 runs universal + one expert (res)
    assert universal["forward_params"] + experts["math"]["trainable_params"] == experts["math"]["forward_params"]
    assert overlaps(experts["math"], experts["code"]), "stage-2 groups did not train at the same time"
    first, last = sorted((experts["math"], experts["code"]), key=lambda r: r["train_started_at"])
    shared = min(first["train_ended_at"], last["train_ended_at"]) - last["train_started_at"]
    assert shared > 0.5 * min(first["train_s"], last["train_s"]), "the windows barely touch"


def test_experts_record_the_universal_they_were_trained_over(tiny_run):
    run_dir, _ = tiny_run
    universal = json.loads((run_dir / "universal" / "config.json").read_text())["sha256"]
    for domain in ("math", "code"):
        config = json.loads((run_dir / "experts" / domain / "config.json").read_text())
        assert config["metadata"]["universal_sha256"] == universal


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
        assert f"[{sub.replace('experts-', 'experts/')}] step" in (run_dir / "logs" / f"{sub}.rank0.log").read_text()


def test_eval_routing_prints_and_saves_the_table(tiny_run):
    run_dir, _ = tiny_run
    out = subprocess.run([sys.executable, "-m", "modula_ray.cli", "eval", str(run_dir), "--suite", "routing",
                          "--rows", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("prompts from"))
    assert lines[header].split()[2:] == ["math", "code"]
    rows = {line.split()[0]: [float(v.rstrip("*")) for v in line.split()[1:]] for line in lines[header + 1:header + 4]}
    assert set(rows) == {"math", "code", "general"}
    assert all(sum(values) == pytest.approx(1.0, abs=2e-3) for values in rows.values())
    saved = json.loads((run_dir / "eval" / "routing.json").read_text())
    assert saved["suite"] == "routing" and saved["rows"] == 4
    assert saved["table"]["math"]["math"] == pytest.approx(rows["math"][0], abs=1e-3)
    layers = saved["layers"]
    assert layers["experts"] == ["math", "code"] and set(layers["domains"]) == {"math", "code"}
    for domain in layers["domains"].values():
        assert 0 <= domain["accuracy"] <= 1
        assert all(sum(domain[key]) == pytest.approx(1.0, abs=2e-3) for key in ("first", "middle", "last"))
    assert "routing accuracy" in out.stdout
    # Reference: a plain full forward per prompt (every position's logits), read as routing_weights
    # and own_expert_hits; routing_tables reads both from one forward with only the last logits.
    from modula_ray.data.build import split_file
    from modula_ray.data.formatting import prompt_ids
    from modula_ray.data.schema import read_split
    from modula_ray.evaluation.routing import captured_gates, own_expert_hits

    model, tokenizer = load_composition(run_dir)
    data_dir = read_manifest(run_dir)["data"]["dir"]
    for index, domain in enumerate(["math", "code"]):
        prompts = read_split(split_file(data_dir, domain, "val")).column("prompt").to_pylist()[:4]
        mean, hits, pairs = {}, 0, 0
        with torch.no_grad(), captured_gates(model) as captured:
            for prompt in prompts:
                captured.clear()
                model(torch.tensor([prompt_ids(tokenizer, prompt)]))
                for expert, weight in routing_weights(model).items():
                    mean[expert] = mean.get(expert, 0.0) + weight / len(prompts)
                row_hits, row_pairs = own_expert_hits(captured, index)
                hits, pairs = hits + row_hits, pairs + row_pairs
        assert saved["table"][domain] == pytest.approx(mean, abs=1e-5)
        assert layers["domains"][domain]["accuracy"] == pytest.approx(hits / pairs, abs=1e-9)


def test_rerun_does_nothing_unless_forced(tiny_run):
    run_dir, manifest = tiny_run
    before = digests(run_dir / "experts") | digests(run_dir / "universal") | digests(run_dir / "router")
    started = time.perf_counter()
    again = run_pipeline(load_config(PipelineConfig, TINY, CONCURRENT), run_dir, command="pytest tiny")
    assert time.perf_counter() - started < 30
    assert len(again["ledger"]) == len(manifest["ledger"])
    assert (digests(run_dir / "experts") | digests(run_dir / "universal") | digests(run_dir / "router")) == before


def test_a_retrained_universal_invalidates_the_experts(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run[0], tmp_path / "swapped")
    model, _ = load_base("tiny-llama")
    inject(model, "modula_res", ["math", "code"], universal_rank=8, domain_rank=4, universal_alpha=16, domain_alpha=8)
    randomise_experts(model, seed=3)
    save_part(model, "universal", run_dir / "universal")  # as if stage 1 ran again after stage 2
    with pytest.raises(ArtifactError, match="expert 'math' was trained over the universal expert with sha256"):
        load_composition(run_dir)
    with pytest.raises(ArtifactError, match="expert 'math' was trained over"):
        add_domain("finance", run_dir)
    assert "finance" not in read_manifest(run_dir)["domains"]


def test_a_different_base_model_is_refused(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run[0], tmp_path / "rebased")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["base_model"]["sha256"] = "0" * 64
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"base model .* has sha256 [0-9a-f]{12}\.\.\., the composition was "
                                            r"trained on 000000000000"):
        load_composition(run_dir)


def test_every_failed_stage2_group_is_reported(tiny_run, ray_local, tmp_path):
    run_dir = copy_run(tiny_run[0], tmp_path / "failing")
    config = load_config(PipelineConfig, TINY, ["stages.experts.crash_at_step=1", "max_failures=0"])
    with pytest.raises(StageFailedError, match="2 of 2 worker groups failed") as info:
        run_stage(config, run_dir, "experts", force=True)
    assert set(info.value.failures) == {"experts/math", "experts/code"}
    assert "experts/math:" in str(info.value) and "experts/code:" in str(info.value)


def test_add_domain_keeps_existing_experts_byte_identical(added):
    run_dir, manifest, before = added
    for name, files in before.items():
        assert digests(run_dir / name) == files, f"{name} changed"
    assert list(manifest["domains"]) == ["math", "code", "finance"]
    assert manifest["router"]["routed"] == ["math", "code", "finance"]
    event = [r for r in manifest["ledger"] if r["event"] == "add-domain:finance"]
    assert [(r["stage"], r["domain"]) for r in event] == [("experts", "finance"), ("router", None)]
    assert load_config(PipelineConfig, run_dir / "config.yaml").domains == ["math", "code", "finance"]
    finance = json.loads((run_dir / "experts" / "finance" / "config.json").read_text())
    universal = json.loads((run_dir / "universal" / "config.json").read_text())
    assert finance["metadata"]["universal_sha256"] == universal["sha256"]
    model, _ = load_composition(run_dir)
    assert model.model.layers[0].self_attn.q_proj.domain.A.shape[0] == 3
    with pytest.raises(ValueError, match="already in the composition"):
        add_domain("finance", run_dir)


def test_molora_add_domain_retrains_all_and_cost_compares(added, ray_local, tmp_path):
    modula_dir, _, _ = added
    # the same optimizer steps as MoDULA's add-domain (60 expert steps + 8 router steps)
    config = load_config(PipelineConfig, TINY, ["method=molora", "stages.joint.steps=68"])
    molora_dir = tmp_path / "molora"
    run_pipeline(config, molora_dir, command="pytest molora")
    assert 0 < loss_of(molora_dir) < 20  # lm-eval's --model modula evaluates a molora run
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
    assert mine["resource_s"] == pytest.approx(sum(r["resource_s"] for r in read_manifest(modula_dir)["ledger"]
                                                   if r["event"] == "add-domain:finance"), abs=1e-6)
    assert report["ratios"]["resource_ratio"] > 0 and report["ratios"]["train_ratio"] > 0
    text = subprocess.run([sys.executable, "-m", "modula_ray.cli", "cost", str(modula_dir), "--against",
                           str(molora_dir)], capture_output=True, text=True, timeout=120).stdout
    assert "pluggability (params x tokens)" in text and "resource-seconds" in text


def test_lora_baseline_is_one_joint_stage(ray_local, tmp_path):
    manifest = run_pipeline(load_config(PipelineConfig, TINY, ["method=lora"]), tmp_path / "lora")
    assert [(r["stage"], r["domain"], r["event"]) for r in manifest["ledger"]] == [("joint", None, "pipeline")]
    assert manifest["universal"]["path"] == "universal" and manifest["router"] is None
    assert list(manifest["domains"]) == ["math", "code"]
    assert all(entry["path"] is None and len(entry["data_sha256"]) == 64 for entry in manifest["domains"].values())
    assert manifest["ledger"][0]["trainable_params"] == 16384  # rank 8 on all 7 projections of 2 blocks
    model, tokenizer = load_composition(tmp_path / "lora")
    assert routing_weights(model(tokenizer("12 + 3", return_tensors="pt").input_ids) and model) == {}
    assert 0 < loss_of(tmp_path / "lora") < 20  # lm-eval's --model modula evaluates a lora run
