"""lm-eval over the tiny run: the one plain ``lm_eval --model modula`` command line of the suite
(the others call what ``modula-ray eval`` calls, in process), every task of ``eval/tasks`` loading
and scoring on the tiny data, the same numbers twice, a composition scoring differently from its
base model alone, and ``modula-ray eval A B`` with each run on its own data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modula_ray.evaluation.tasks import data_dir_of
from modula_ray.ray_session import OFFLINE_ENV

pytestmark = pytest.mark.slow
TASKS = Path(__file__).resolve().parents[2] / "eval" / "tasks"


def test_a_plain_lm_eval_command_line_runs_modula(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    cli = Path(sys.executable).with_name("lm_eval")
    done = subprocess.run([str(cli), "--model", "modula", "--model_args", f"run={run_dir}", "--include_path", str(TASKS),
                           "--tasks", "modula_math,modula_medicine", "--limit", "5", "--output_path", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|modula_math" in done.stdout and "|modula_medicine" in done.stdout
    [results] = tmp_path.rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]
    # the command line scores what modula-ray eval's in-process call scores (greedy: the same numbers)
    from modula_ray.evaluation.lm import ModulaLM

    reference = evaluate(ModulaLM(run=str(run_dir)), ["modula_math", "modula_medicine"], limit=5)
    assert scores["modula_math"]["score,none"] == pytest.approx(reference["modula_math"]["score"])
    assert scores["modula_medicine"]["acc,none"] == pytest.approx(reference["modula_medicine"]["acc"])
    assert scores["modula_medicine"]["acc_norm,none"] == pytest.approx(reference["modula_medicine"]["acc_norm"])


def evaluate(model, tasks, limit=2, data_dir=None) -> dict:
    """``{task: {metric: value}}`` through what ``modula-ray eval`` itself calls (on the model's own
    data folder, or ``data_dir`` for a model without one: a base model alone, a plain ``HFLM``)."""
    from modula_ray.evaluation.run import evaluate_model

    return evaluate_model(model, tasks, data_dir=data_dir, limit=limit)[0]


def loss_of(run_dir, limit: int = 2) -> float:
    """``--model modula`` on ``run_dir``: the held-out math loss per byte (any method), checked against
    lm-eval's own ``HFLM`` over ``load_composition(run_dir)`` and against the base model alone."""
    from lm_eval.models.huggingface import HFLM

    from modula_ray.compose import load_composition
    from modula_ray.evaluation.lm import ModulaLM

    def loss(lm, data_dir=None) -> float:
        return evaluate(lm, ["modula_loss_math"], limit=limit, data_dir=data_dir)["modula_loss_math"]["nll_per_byte"]

    ours, data_dir = loss(ModulaLM(run=str(run_dir))), data_dir_of(run_dir)  # ours finds the run's data itself
    model, tokenizer = load_composition(run_dir)
    assert ours == pytest.approx(loss(HFLM(pretrained=model, tokenizer=tokenizer), data_dir), rel=1e-6)
    assert ours != pytest.approx(loss(ModulaLM(base="tiny-llama"), data_dir), rel=1e-4), "scored the base model alone"
    return ours


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
    base = evaluate(ModulaLM(base="tiny-llama", data_dir=data_dir_of(tiny_run[0])), ["modula_loss_math"], limit=4)
    assert composed["modula_loss_math"]["nll_per_byte"] != pytest.approx(base["modula_loss_math"]["nll_per_byte"])
    with pytest.raises(ValueError, match="exactly one of run=RUN_DIR"):
        ModulaLM(run=str(tiny_run[0]), base="tiny-llama")


def test_the_eval_command_writes_results_and_a_report_and_compares_two_runs(tiny_run, added, tmp_path,
                                                                           monkeypatch):
    """``modula-ray eval A B`` in one process, where B (the run with finance added) reads a data
    folder built with another seed: results and a report per run, a side-by-side report, and B
    scored on B's own data (the data folder was once a process-wide default that A set for B)."""
    from modula_ray.cli import main
    from modula_ray.compose import Manifest
    from modula_ray.data.build import build_datasets
    from modula_ray.evaluation.lm import ModulaLM
    from modula_ray.evaluation.report import write_report
    from tests.integration.conftest import copy_run

    one, two = copy_run(tiny_run[0], tmp_path / "tiny"), copy_run(added[0], tmp_path / "added")
    other = build_datasets("tiny", 7, tmp_path / "seed7", ["math", "code", "medicine", "finance", "ecommerce"],
                           progress=False)
    manifest = Manifest.read(two)
    manifest.record_data(tmp_path / "seed7")
    manifest.save()
    assert other["domains"]["math"]["splits"]["test"]["sha256"] != json.loads(
        (Path(data_dir_of(one)) / "datasets.json").read_text())["domains"]["math"]["splits"]["test"]["sha256"]

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # both runs in this process, one after the other
    assert main(["eval", str(one), str(two), "--suite", "domain", "--limit", "2"]) == 0
    results = json.loads((one / "eval" / "results.json").read_text())["suites"]["domain"]
    assert results["limit"] == 2 and set(results["composition"]) >= {"modula_math", "modula_humaneval"}
    assert results["composition"]["modula_domain_loss"]["nll_per_byte"] != results["base"]["modula_domain_loss"][
        "nll_per_byte"]
    report = (one / "eval" / "report.md").read_text()
    assert "| modula_res (tiny) |" in report and "| tiny-llama (base alone) |" in report and "Avg." in report
    side = write_report([one, two], tmp_path / "side.md").read_text()
    assert "| modula_res (tiny) |" in side and "| modula_res (added) |" in side
    assert (tmp_path / "cost_quality.png").stat().st_size > 1000
    second = json.loads((two / "eval" / "results.json").read_text())["suites"]["domain"]
    on_seed7 = evaluate(ModulaLM(run=str(two)), ["modula_loss_math"], limit=2)  # B alone, in a fresh evaluation
    assert second["composition"]["modula_loss_math"]["nll_per_byte"] == pytest.approx(
        on_seed7["modula_loss_math"]["nll_per_byte"])
    on_seed0 = evaluate(ModulaLM(run=str(two)), ["modula_loss_math"], limit=2, data_dir=data_dir_of(one))
    assert on_seed7["modula_loss_math"]["nll_per_byte"] != pytest.approx(on_seed0["modula_loss_math"]["nll_per_byte"])
