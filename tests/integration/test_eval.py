"""lm-eval over the tiny run: a plain ``lm_eval --model modula`` command line, every task of
``eval/tasks`` loading and scoring on the tiny data, the same numbers twice, and a composition
scoring differently from its base model alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TASKS = Path(__file__).resolve().parents[2] / "eval" / "tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_a_plain_lm_eval_command_line_runs_modula(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    cli = Path(sys.executable).with_name("lm_eval")
    done = subprocess.run([str(cli), "--model", "modula", "--model_args", f"run={run_dir}", "--include_path", str(TASKS),
                           "--tasks", "modula_math,modula_medicine", "--limit", "5", "--output_path", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|modula_math" in done.stdout and "|modula_medicine" in done.stdout
    [results] = tmp_path.rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]
    assert 0 <= scores["modula_math"]["score,none"] <= 1 and 0 <= scores["modula_medicine"]["acc,none"] <= 1


def evaluate(model, tasks, limit=2) -> dict:
    """``{task: {metric: value}}`` through what ``modula-ray eval`` itself calls."""
    from modula_ray.evaluation.run import evaluate_model

    return evaluate_model(model, tasks, limit=limit)[0]


def loss_of(run_dir) -> float:
    """``--model modula`` on ``run_dir``: the held-out math loss per byte (any method)."""
    from modula_ray.evaluation.lm import ModulaLM

    return evaluate(ModulaLM(run=str(run_dir)), ["modula_loss_math"], limit=2)["modula_loss_math"]["nll_per_byte"]


def test_modula_evaluates_a_flan_composition(ray_local, tmp_path):
    """modula_res is the tiny run; lora and molora are checked where test_pipeline trains them."""
    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.train.pipeline import run_pipeline
    from tests.integration.conftest import TINY

    run_pipeline(load_config(PipelineConfig, TINY, ["method=modula_flan"]), tmp_path / "flan", command="pytest flan")
    assert 0 < loss_of(tmp_path / "flan") < 20


def test_every_task_scores_on_the_tiny_data_the_same_twice(tiny_run):
    from modula_ray.evaluation.lm import ModulaLM

    model = ModulaLM(run=str(tiny_run[0]), batch_size=4)
    first, second = evaluate(model, ["modula_all"]), evaluate(model, ["modula_all"])
    expected = {"modula_math": "score", "modula_code": "score", "modula_medicine": "acc_norm",
                "modula_finance": "acc", "modula_ecommerce": "exact_match", "modula_general": "acc",
                "modula_humaneval": "pass_at_1", "modula_domain_loss": "nll_per_byte",
                **{f"modula_loss_{d}": "nll_per_byte" for d in ("math", "code", "medicine", "finance", "ecommerce")}}
    for task, metric in expected.items():
        assert isinstance(first[task][metric], float), (task, first[task])
    assert first == second


def test_a_composition_is_not_its_base_model(tiny_run):
    from modula_ray.evaluation.lm import ModulaLM

    composed = evaluate(ModulaLM(run=str(tiny_run[0])), ["modula_loss_math"], limit=4)
    base = evaluate(ModulaLM(base="tiny-llama"), ["modula_loss_math"], limit=4)
    assert composed["modula_loss_math"]["nll_per_byte"] != pytest.approx(base["modula_loss_math"]["nll_per_byte"])
    with pytest.raises(ValueError, match="exactly one of run=RUN_DIR"):
        ModulaLM(run=str(tiny_run[0]), base="tiny-llama")


def test_the_eval_command_writes_results_and_a_report_and_compares_two_runs(tiny_run, added, tmp_path):
    from modula_ray.cli import main
    from modula_ray.evaluation.report import write_report
    from tests.integration.conftest import copy_run

    one, two = copy_run(tiny_run[0], tmp_path / "tiny"), copy_run(added[0], tmp_path / "added")
    for run_dir in (one, two):
        assert main(["eval", str(run_dir), "--suite", "domain", "--limit", "2"]) == 0
    results = json.loads((one / "eval" / "results.json").read_text())["suites"]["domain"]
    assert results["limit"] == 2 and set(results["composition"]) >= {"modula_math", "modula_humaneval"}
    assert results["composition"]["modula_domain_loss"]["nll_per_byte"] != results["base"]["modula_domain_loss"][
        "nll_per_byte"]
    report = (one / "eval" / "report.md").read_text()
    assert "| modula_res (tiny) |" in report and "| tiny-llama (base alone) |" in report and "Avg." in report
    side = write_report([one, two], tmp_path / "side.md").read_text()
    assert "| modula_res (tiny) |" in side and "| modula_res (added) |" in side
    assert (tmp_path / "cost_quality.png").stat().st_size > 1000
