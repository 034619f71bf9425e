"""Ray-free parts of training: the loop's setup/step/checkpoint/finish on the tiny model, ledger maths,
resource check, tasks, configs."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modula_ray.config import PipelineConfig, ScalingSpec, StageConfig, from_dict, load_config, to_dict
from modula_ray.errors import ResourceUnavailableError
from modula_ray.experts.serialization import read_part, tensors_sha256
from modula_ray.train.ledger import compare, event_cost, make_record, overlaps, training_flops
from modula_ray.train.loop import (after_step_hook, finish, report_due, resume, save_checkpoint, setup, train_step,
                                   window_metrics)
from modula_ray.train.pipeline import plan_groups
from modula_ray.train.resources import check_groups
from modula_ray.train.schedule import lr_lambda
from modula_ray.train.task import AFTER_STEP_ENV, PartRef, RunContext, StageTask

ROOT = Path(__file__).resolve().parents[2]


# modula_res over the tiny Llama; dropout, so an exact resume needs the RNG state too
EXPERTS = {"target_modules": ["q_proj", "v_proj"], "universal_rank": 4, "domain_rank": 2, "universal_alpha": 8.0,
           "domain_alpha": 4.0, "dropout": 0.1}
ROWS = [{"id": f"{i:03d}", "prompt": f"what is {i} + {i * 3 % 97}?", "response": f"{i + i * 3 % 97}"}
        for i in range(12)]
# seed 0, batch 2, both steps at lr 0.01 (warmup 1); the same on 1 and 2 torch threads
PINNED_FIRST_LOSS, PINNED_LOSS_2_STEPS, PINNED_TOKENS_2_STEPS = 6.23375, 6.23721, 103


def tiny_task(run_dir: Path, **hparams) -> StageTask:
    stage = StageConfig(**{"steps": 4, "batch_size": 2, "lr": 0.01, "warmup_steps": 1, "log_every": 2,
                           "checkpoint_every": 2, **hparams})
    return StageTask(key="universal", stage="universal", method="modula_res", domains=["math"],
                     base_model="tiny-llama", experts=EXPERTS, data_dir=str(run_dir), data_domains=["math"],
                     hparams=to_dict(stage), run_dir=str(run_dir), log_to_files=False,
                     save=[PartRef("universal", str(run_dir / "universal"))], metadata={"run_id": "unit"})


def test_two_steps_on_the_tiny_model_give_the_pinned_losses(tmp_path):
    state = setup(tiny_task(tmp_path), ROWS)
    # universal rank 4 on q (64 -> 64) and v (64 -> 32) of 2 layers: A is r x in, B is out x r
    assert (len(state.examples), state.trainable_params) == (12, 2 * 4 * ((64 + 64) + (64 + 32)))
    train_step(state)
    assert report_due(state) == (False, False)
    train_step(state)
    assert report_due(state) == (True, True)
    metrics = window_metrics(state)
    assert state.counters["first_loss"] == pytest.approx(PINNED_FIRST_LOSS, abs=1e-5)
    assert metrics["loss"] == pytest.approx(PINNED_LOSS_2_STEPS, abs=1e-5)  # the mean over steps 1-2
    assert metrics["lr"] == pytest.approx(0.01 * lr_lambda(1, 4)(2))
    assert (metrics["step"], state.counters["tokens"]) == (2, PINNED_TOKENS_2_STEPS)


def test_setup_step_checkpoint_resume_finish_round_trip(tmp_path):
    """Steps 1-4 straight, against steps 1-2, a checkpoint, a fresh setup resumed from it, steps 3-4."""
    task = tiny_task(tmp_path)
    straight = setup(task, ROWS)
    train_step(straight)
    train_step(straight)
    (tmp_path / "checkpoint").mkdir()
    save_checkpoint(straight, tmp_path / "checkpoint")
    while straight.step < 4:
        train_step(straight)

    resumed = setup(task, ROWS)
    resume(resumed, tmp_path / "checkpoint")
    assert (resumed.step, resumed.resumed_from) == (2, 2), "a restart from step 0 would also end at step 4"
    while resumed.step < 4:
        train_step(resumed)
    for name, tensor in straight.params.items():
        assert torch.equal(tensor, resumed.params[name]), name
    assert resumed.counters["tokens"] == straight.counters["tokens"]  # restored, not restarted

    final = finish(resumed, node_id="local")
    config, tensors = read_part(tmp_path / "universal")
    assert final["rank_part_sha256"] == [{"universal": tensors_sha256(tensors)}] and final["rank_nodes"] == ["local"]
    assert (final["step"], final["resumed_from_step"], final["tokens"]) == (4, 2, straight.counters["tokens"])
    assert final["first_loss"] == pytest.approx(PINNED_FIRST_LOSS, abs=1e-5) and config["metadata"]["run_id"] == "unit"


CALLS = []


def remember_step(state, *, tag: str) -> None:
    CALLS.append((tag, state.step))


def test_after_step_hook_comes_from_the_environment_through_the_task(tmp_path, monkeypatch):
    config = from_dict(PipelineConfig, {"method": "modula_res"})
    run = RunContext(config=config, run_dir=str(tmp_path), data_dir="/d", base_model="/m", base_sha256="0" * 64,
                     run_id="r", domains=["math"])
    plain = run.task("universal", "universal", domains=["math"], data_domains=["math"],
                     stage_config=config.stage("universal"))
    assert plain.after_step is None
    monkeypatch.setenv(AFTER_STEP_ENV, json.dumps({"call": f"{__name__}:remember_step", "tag": "t"}))
    task = run.task("universal", "universal", domains=["math"], data_domains=["math"],
                    stage_config=config.stage("universal"))
    worker_side = StageTask.from_dict(json.loads(json.dumps(task.to_dict())))  # what a Ray worker receives
    after_step_hook(worker_side)(SimpleNamespace(step=3))
    assert CALLS[-1] == ("t", 3)


def test_flops_and_cost_comparison():
    assert training_flops(forward_params=100, trainable_params=10, tokens=3) == (400 + 20) * 3
    ledger = [
        {"event": "add-domain:x", "trainable_params": 10, "tokens": 100, "flops": 5, "fit_started_at": 0.0,
         "fit_ended_at": 5.0, "train_started_at": 1.0, "train_ended_at": 4.0, "startup_s": 1.0, "resource_s": 6.0},
        {"event": "add-domain:x", "trainable_params": 2, "tokens": 50, "flops": 1, "fit_started_at": 5.0,
         "fit_ended_at": 7.0, "train_started_at": 5.5, "train_ended_at": 6.0, "startup_s": 0.5, "resource_s": 0.5},
        {"event": "pipeline", "trainable_params": 99, "tokens": 99, "flops": 9, "fit_started_at": 0.0,
         "fit_ended_at": 1.0, "train_started_at": 0.5, "train_ended_at": 1.0, "startup_s": 0.5, "resource_s": 1.0}]
    mine = event_cost(ledger, "add-domain:x")
    assert (mine["params_x_tokens"], mine["fit_wall_s"], mine["train_s"], mine["startup_s"], mine["resource_s"]) == (
        1100, 7.0, 5.0, 1.5, 6.5)
    theirs = {"params_x_tokens": 4400, "flops": 12, "fit_wall_s": 14.0, "train_s": 10.0, "resource_s": 26.0}
    assert compare(mine, theirs) == {"params_x_tokens_ratio": 0.25, "flops_ratio": 0.5, "fit_wall_ratio": 0.5,
                                     "train_ratio": 0.5, "resource_ratio": 0.25}
    # overlap is decided by the worker-side training windows, not the driver's fit calls
    assert not overlaps(ledger[0], ledger[1])
    assert overlaps(ledger[0], {"train_started_at": 3.0, "train_ended_at": 5.0})
    assert not overlaps(ledger[0], {"fit_started_at": 0.0, "train_started_at": 4.5, "train_ended_at": 9.0})
    # or by the workers' lives: a group still loading while the other trains
    loading = {"worker_started_at": 3.5, "train_started_at": 4.5, "train_ended_at": 9.0}
    assert overlaps({**ledger[0], "worker_started_at": 1.0}, loading, since="worker_started_at")
    assert not overlaps(ledger[0], loading)


def test_record_counts_resource_seconds_from_the_request():
    metrics = {"trainable_params": 10, "forward_params": 1000, "tokens": 400, "train_started_at": 103.0,
               "train_ended_at": 113.0, "peak_mem_mb": 1.0, "loss": 2.0, "first_loss": 3.0}
    half = make_record(stage="experts", domain="math", event="pipeline", metrics=metrics, run_name="r",
                       spec=ScalingSpec(num_workers=2, resources_per_worker={"CPU": 0.5}), fit_started_at=100.0,
                       fit_ended_at=120.0)
    assert (half["train_s"], half["startup_s"], half["fit_wall_s"]) == (10.0, 3.0, 20.0)
    assert half["resource_s"] == 10.0 and half["resource_unit"] == "CPU"  # 10 s x 2 workers x 0.5 CPU
    assert half["flops"] == (4 * 1000 + 2 * 10) * 400 and half["tokens_per_s"] == 40.0
    assert half["startup_phases"] is None  # a loop without the start-up clock (an older run's report)
    clocked = make_record(stage="experts", domain="math", event="pipeline", run_name="r", spec=ScalingSpec(),
                          metrics={**metrics, "startup_phases": {"loading_at": 100.5, "entered_at": 101.25,
                                                                 "ready_at": 102.0}},
                          fit_started_at=100.0, fit_ended_at=120.0)
    assert clocked["startup_phases"] == {"ray_s": 0.5, "imports_s": 0.75, "setup_s": 0.75, "first_step_s": 1.0}
    gpu = make_record(stage="router", domain=None, event="pipeline", metrics=metrics, run_name="r",
                      spec=ScalingSpec(num_workers=4, use_gpu=True, resources_per_worker={"CPU": 8}),
                      fit_started_at=100.0, fit_ended_at=120.0)
    assert gpu["resource_unit"] == "GPU" and gpu["resource_s"] == 40.0  # 10 s x 4 workers x 1 GPU


NODES = [{"resources": {"CPU": 4.0, "GPU": 1.0, "pool_math": 1.0}, "labels": {"pool": "math"}},
         {"resources": {"CPU": 2.0}, "labels": {"pool": "cpu"}}]


def test_resource_check_places_groups_per_node_and_label():
    assert check_groups([("a", ScalingSpec(num_workers=3, resources_per_worker={"CPU": 2}))], NODES) == []
    with pytest.raises(ResourceUnavailableError, match=r"b: requested 4 worker\(s\) x \{'CPU': 2\}.*can place 3"):
        check_groups([("b", ScalingSpec(num_workers=4, resources_per_worker={"CPU": 2}))], NODES)
    with pytest.raises(ResourceUnavailableError, match="labelled {'pool': 'cpu'}.*GPU: 1"):
        check_groups([("c", ScalingSpec(use_gpu=True, node_labels={"pool": "cpu"}))], NODES)
    warnings = check_groups([("d", ScalingSpec(num_workers=2, resources_per_worker={"CPU": 2})),
                             ("e", ScalingSpec(num_workers=2, resources_per_worker={"CPU": 2}))], NODES)
    assert warnings and "some will wait" in warnings[0]


def test_plan_groups_follow_the_method_and_overrides():
    config = load_config(PipelineConfig, ROOT / "jobs/configs/gpu-llama7b.yaml")
    groups = dict(plan_groups(config))
    assert list(groups) == ["universal", "experts/math", "experts/code", "experts/medicine", "experts/ecommerce",
                            "router"]
    assert groups["experts/code"].num_workers == 4 and groups["experts/code"].node_labels == {"pool": "code"}
    assert groups["experts/math"].num_workers == 2 and config.stage("experts", "code").steps == 1500
    assert config.torch_dtype_name(use_gpu=True) == "bfloat16" and config.torch_dtype_name(False) == "float32"
    molora = from_dict(PipelineConfig, {"method": "molora"})
    assert [name for name, _ in plan_groups(molora)] == ["joint"]


def test_stage_task_round_trips_through_plain_data():
    task = StageTask(key="experts/math", stage="experts", method="modula_res", domains=["math"], base_model="/m",
                     experts={"target_modules": ["q_proj"]}, data_dir="/d", data_domains=["math"],
                     hparams={"steps": 1}, run_dir="/r", load=[PartRef("universal", "/r/universal")],
                     save=[PartRef("domain", "/r/experts/math", "math")])
    again = StageTask.from_dict(task.to_dict())
    assert again == task and again.slug == "experts-math"


@pytest.mark.parametrize("script", ["pipeline.py", "train_stage.py", "add_domain.py", "tune.py"])
def test_job_scripts_have_help(script):
    out = subprocess.run([sys.executable, f"jobs/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_every_config_starts_with_the_command_that_runs_it():
    for path in sorted((ROOT / "jobs/configs").glob("*.yaml")) + [ROOT / "cluster/runtime_env.yaml"]:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("python jobs/" in first or "ray job submit" in first), path


def test_a_no_grad_forward_after_an_optimizer_step_reads_the_new_weights():
    """Fused AdamW writes in place without bumping autograd's version counter, which the expert
    layers' no-grad caches key on: the engine marks the weights changed after every step (a
    validation between steps once read the zero-init router of its first call)."""
    from modula_ray.experts import expert_layers, inject, set_stage, trainable_parameters
    from modula_ray.models import tiny_model
    from modula_ray.train.engine import make_engine
    from tests.helpers import randomise_experts

    model, tokenizer = tiny_model()
    inject(model, "modula_res", ["math", "code"], universal_rank=4, domain_rank=2)
    randomise_experts(model, seed=2)
    set_stage(model, "router")
    hp = {"lr": 0.5, "weight_decay": 0.0, "warmup_steps": 0, "steps": 4, "grad_accum": 1, "max_grad_norm": None,
          "aux_loss_coef": 0.0, "route_loss_coef": 0.0}
    engine = make_engine(model, trainable_parameters(model), hp, 1, "float32")
    ids = tokenizer("the patient takes 12 doses", return_tensors="pt").input_ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        before = model(ids).logits  # builds the no-grad caches
    engine.micro_step(batch, last=True)
    engine.finish_step()
    with torch.no_grad():
        cached = model(ids).logits
        for layer in expert_layers(model).values():
            layer._fused.clear()
        fresh = model(ids).logits
    assert not torch.allclose(before, fresh)  # the step moved the routers
    assert torch.equal(cached, fresh)


class _Payload:
    """What a writer of checkpoint storage could plant: unpickling it would run code."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PWNED']).touch()",))


def test_a_checkpoint_round_trips_with_weights_only_and_refuses_a_planted_pickle(tmp_path, monkeypatch):
    import pickle
    import random

    import numpy as np

    from modula_ray.train import checkpointing
    from modula_ray.train.schedule import lr_lambda

    def trained():
        params = {"w": torch.nn.Parameter(torch.zeros(3, 3))}
        optimizer = torch.optim.AdamW(params.values(), lr=0.1)
        return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(2, 10))

    torch.manual_seed(0)
    params, optimizer, scheduler = trained()
    for _ in range(3):
        (params["w"] * torch.randn(3, 3)).sum().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    checkpointing.write(tmp_path, rank=0, step=3, counters={"tokens": 5, "domain_first_loss": {"math": None}},
                        params=params, optimizer=optimizer, scheduler=scheduler)
    expected = (torch.rand(1).item(), random.random(), float(np.random.rand()))
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    again, optimizer2, scheduler2 = trained()
    step, counters = checkpointing.restore(tmp_path, rank=0, params=again, optimizer=optimizer2, scheduler=scheduler2)
    assert (step, counters) == (3, {"tokens": 5, "domain_first_loss": {"math": None}})
    assert torch.equal(again["w"], params["w"]) and scheduler2.last_epoch == 3
    assert (torch.rand(1).item(), random.random(), float(np.random.rand())) == expected  # every RNG resumes

    monkeypatch.setenv("PWNED", str(tmp_path / "pwned"))
    torch.save({"step": 3, "params": {}, "optimizer": _Payload(), "scheduler": None}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        checkpointing.restore(tmp_path, rank=0, params=again, optimizer=optimizer2, scheduler=scheduler2)
    assert not (tmp_path / "pwned").exists()
