"""Kill-and-resume gives bit-identical weights (plain, DDP and DeepSpeed ZeRO-2); bad configs fail before
training; a 2-worker DDP run keeps its ranks identical; DeepSpeed ZeRO-2 and ZeRO-3 really run on CPU."""
import runpy
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modula_ray.config import PipelineConfig, load_config
from modula_ray.errors import ConfigError, ResourceUnavailableError
from modula_ray.experts.serialization import tensors_sha256
from modula_ray.train.pipeline import run_pipeline, run_stage
from tests.integration.conftest import ROOT, TINY, tiny_config
from tests.integration.faults import crash

pytestmark = pytest.mark.slow
RESUME = ["stages.universal.steps=9", "stages.universal.checkpoint_every=3", "stages.universal.log_every=3",
          "stages.universal.warmup_steps=2", "experts.dropout=0.1"]  # dropout: the RNG state must resume too
TWO_WORKERS = ["stages.universal.scaling.num_workers=2", "stages.universal.lr=0.01"]


def universal_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "universal" / "adapter.safetensors"))


def straight_and_crashed(tmp_path, monkeypatch, extra: list[str]) -> tuple[dict, dict]:
    """The universal stage run straight through, and again with rank 0 killed at step 5 and resumed:
    ``(straight record, crashed record)``, after checking the two give bit-identical weights."""
    crash(monkeypatch, "universal", 5, run_dir=tmp_path / "crashed")  # the last checkpoint before step 5 is 3
    with ThreadPoolExecutor(2) as pool:  # two independent Ray Train runs at once (as stage 2 runs its groups)
        runs = [pool.submit(run_stage, tiny_config(*RESUME, *extra, *retries), tmp_path / name, "universal")
                for name, retries in (("straight", []), ("crashed", ["max_failures=1"]))]
        straight, crashed = (run.result() for run in runs)
    assert (tmp_path / "crashed" / ".crashed-universal-step5").exists(), "the worker never died: nothing resumed"
    a, b = universal_weights(tmp_path / "straight"), universal_weights(tmp_path / "crashed")
    assert a.keys() == b.keys() and len(a) == 28  # 2 blocks x 7 projections x (A, B)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    first, second = straight["ledger"][-1], crashed["ledger"][-1]
    assert first["resumed_from_step"] is None
    assert second["resumed_from_step"] == 3, "a restart from step 0 would also give equal weights"
    assert second["tokens"] == first["tokens"]  # counters were restored, not restarted
    assert second["train_started_at"] < second["train_ended_at"] and second["train_s"] > 0
    return first, second


def test_killed_worker_resumes_to_exactly_the_same_weights(ray_local, tmp_path, monkeypatch):
    first, _ = straight_and_crashed(tmp_path, monkeypatch, [])
    assert first["engine"] == "torch" and first["num_workers"] == 1


def test_ddp_two_workers_learn_together_and_resume(ray_local, tmp_path, monkeypatch):
    first, second = straight_and_crashed(tmp_path, monkeypatch, TWO_WORKERS)
    for record in (first, second):
        assert record["engine"] == "ddp" and record["num_workers"] == 2
        assert record["final_loss"] < record["first_loss"] - 0.05, "two DDP workers did not learn"
    digests = [r["rank_part_sha256"] for r in (first, second)]
    for ranks in digests:
        assert len(ranks) == 2 and ranks[0] == ranks[1], "the two ranks ended with different weights"
    saved = tensors_sha256(universal_weights(tmp_path / "straight"))
    assert digests[0][0]["universal"] == saved and digests[1][0]["universal"] == saved


@pytest.mark.parametrize("override, field", [(["method=mixtral"], "method"), (["domains=[math, astrology]"], "domains"),
                                             (["stages.router.lr=-1"], "stages.router.lr")])
def test_bad_config_is_rejected_before_ray(override, field, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(PipelineConfig, TINY, override)
    assert info.value.field == field and "tiny.yaml" in str(info.value)
    entry = ["jobs/pipeline.py", "--config", str(TINY), "--out", str(tmp_path / "r"), "--set", override[0]]
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))  # as `python jobs/pipeline.py` puts its folder first
    monkeypatch.setattr(sys, "argv", entry)
    with pytest.raises(SystemExit) as exit_info:  # the ray job submit entry point, in process
        runpy.run_path(str(ROOT / entry[0]), run_name="__main__")
    assert exit_info.value.code == 2 and field in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was started or written


def test_unsatisfiable_resources_fail_fast_naming_both_sides(ray_local, tmp_path):
    config = tiny_config("stages.universal.scaling.num_workers=3", "stages.universal.scaling.resources_per_worker={CPU: 2}")
    with pytest.raises(ResourceUnavailableError) as info:
        run_pipeline(config, tmp_path / "run")
    message = str(info.value)
    assert "universal" in message and "3 worker(s) x {'CPU': 2.0}" in message and "CPU: 4" in message
    assert not (tmp_path / "run" / "ray").exists(), "no Ray Train run was started"
    gpu = tiny_config("stages.experts.domains.math.scaling.use_gpu=true")
    with pytest.raises(ResourceUnavailableError, match="experts/math.*GPU"):
        run_pipeline(gpu, tmp_path / "gpu")


def test_deepspeed_zero2_learns_and_resumes(ray_local, tmp_path, monkeypatch):
    first, second = straight_and_crashed(tmp_path, monkeypatch,
                                         TWO_WORKERS + ["stages.universal.deepspeed={zero_stage: 2}"])
    for record in (first, second):
        assert record["engine"] == "deepspeed-zero2", "a DeepSpeedEngine with ZeRO stage 2 must have run"
        # first_loss: step 1's batches under the initial weights (B = 0: exactly the base model)
        assert record["final_loss"] < record["first_loss"] - 0.05, "ZeRO-2 did not learn"


def test_deepspeed_zero3_saves_the_gathered_weights(ray_local, tmp_path):
    config = tiny_config(*RESUME, *TWO_WORKERS, "stages.universal.deepspeed={zero_stage: 3}")
    record = run_stage(config, tmp_path / "z3", "universal")["ledger"][-1]
    assert record["engine"] == "deepspeed-zero3" and record["num_workers"] == 2
    assert record["final_loss"] < record["first_loss"] - 0.05, "ZeRO-3 did not learn"
    weights = universal_weights(tmp_path / "z3")
    assert all(t.numel() > 0 for t in weights.values()) and len(weights) == 28  # whole tensors, not shards
    assert any(t.abs().sum() > 0 for k, t in weights.items() if k.endswith(".B"))  # B moved off its zero init
    gathered = [ranks["universal"] for ranks in record["rank_part_sha256"]]
    assert gathered[0] == gathered[1] == tensors_sha256(weights), "the saved part is not the gathered weights"
