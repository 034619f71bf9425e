"""Ray-free parts of training: batch schedule, LR schedule, ledger maths, resource check, tasks, configs."""
import subprocess
import sys
from pathlib import Path

import pytest

from modula_ray.config import PipelineConfig, ScalingSpec, from_dict, load_config
from modula_ray.errors import ResourceUnavailableError
from modula_ray.train.engine import lr_lambda
from modula_ray.train.ledger import compare, event_cost, make_record, overlaps, training_flops
from modula_ray.train.pipeline import plan_groups
from modula_ray.train.resources import check_groups
from modula_ray.train.schedule import BatchSchedule
from modula_ray.train.task import PartRef, StageTask

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_covers_each_epoch_once_across_ranks_and_is_pure():
    n, world, b, accum = 10, 2, 2, 1
    ranks = [BatchSchedule(n, world=world, rank=r, batch_size=b, grad_accum=accum, seed=3) for r in range(world)]
    seen = []
    for step in range(0, 5):  # 5 steps x 4 examples = 2 epochs
        for micro in range(accum):
            parts = [s.indices(step, micro) for s in ranks]
            if step < 2:  # steps 0-1 lie inside epoch 0: the ranks share no example
                assert not set(parts[0]) & set(parts[1])
            seen += parts[0] + parts[1]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # each epoch reshuffled
    fresh = BatchSchedule(n, world=world, rank=1, batch_size=b, grad_accum=accum, seed=3)
    assert fresh.indices(4, 0) == ranks[1].indices(4, 0)  # resuming needs only the step


def test_lr_warmup_then_cosine_to_ten_percent():
    f = lr_lambda(warmup=2, total=10)
    assert [round(f(s), 3) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)


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


def test_record_counts_resource_seconds_from_the_request():
    metrics = {"trainable_params": 10, "forward_params": 1000, "tokens": 400, "train_started_at": 103.0,
               "train_ended_at": 113.0, "peak_mem_mb": 1.0, "loss": 2.0, "first_loss": 3.0}
    half = make_record(stage="experts", domain="math", event="pipeline", metrics=metrics, run_name="r",
                       spec=ScalingSpec(num_workers=2, resources_per_worker={"CPU": 0.5}), fit_started_at=100.0,
                       fit_ended_at=120.0)
    assert (half["train_s"], half["startup_s"], half["fit_wall_s"]) == (10.0, 3.0, 20.0)
    assert half["resource_s"] == 10.0 and half["resource_unit"] == "CPU"  # 10 s x 2 workers x 0.5 CPU
    assert half["flops"] == (4 * 1000 + 2 * 10) * 400 and half["tokens_per_s"] == 40.0
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
