"""Ray Tune over the tiny run's router: one real search (ASHA, 4 trials, 2 at once) through the
command line, interrupted with Ctrl-C and resumed with Tuner.restore, whose best router is installed;
the validation metrics checked against the evaluation package; bad input refused before anything runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from modula_ray.ray_session import OFFLINE_ENV
from tests.integration.conftest import copy_run

pytestmark = pytest.mark.slow
SPACE = {"search": {"algorithm": "random", "metric": "val_loss", "num_samples": 4, "max_concurrent": 2, "seed": 0},
         "scheduler": {"name": "asha", "grace_period": 4, "reduction_factor": 2},
         "validation": {"split": "val", "rows": 4, "every": 4},
         "trial": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "torch_threads": 1},
         "space": {"lr": {"loguniform": [0.001, 0.05]}, "temperature": {"uniform": [0.5, 2.0]},
                   "top_k": {"choice": [None, 1, 2]}, "steps": {"choice": [8, 12]},
                   "router_placement": {"choice": ["layer", "block"]},
                   "data_weights.general": {"uniform": [0.5, 1.5]}}}


def space_file(folder: Path, **search) -> Path:
    data = json.loads(json.dumps(SPACE))
    data["search"].update(search)
    path = folder / "space.yaml"
    path.write_text("# modula-ray tune router --run RUN --space space.yaml\n" + yaml.safe_dump(data))
    return path


def _ended(line: str) -> bool:
    return line.startswith("[tune]") and (" finished " in line or " stopped by the scheduler " in line)


@pytest.fixture(scope="module")
def tuned(tiny_run, ray_local, tmp_path_factory):
    """One search as a user runs it: ``modula-ray tune router`` (joining this Ray), Ctrl-C (SIGINT)
    once two trials ended, then the same command again, which restores the search and installs the
    best router. ``(run_dir, manifest before, first output, ended trials' results then, second run)``."""
    run_dir = copy_run(tiny_run[0], tmp_path_factory.mktemp("tune") / "run")
    before = json.loads((run_dir / "manifest.json").read_text())
    command = [str(Path(sys.executable).with_name("modula-ray")), "tune", "router", "--run", str(run_dir),
               "--space", str(space_file(run_dir.parent))]
    env = {**os.environ, **OFFLINE_ENV, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ended, deadline = [], time.monotonic() + 300
    try:
        for line in process.stdout:
            if _ended(line):
                ended.append(line.split()[1])
            if len(ended) == 2 or time.monotonic() > deadline:
                break
        assert len(ended) == 2, "two trials did not end in time"
        process.send_signal(signal.SIGINT)
        first = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    experiment = run_dir / "tune" / "router"
    results_then = {t: (experiment / f"trial_{t}" / "result.json").read_text() for t in ended}
    interrupted = SimpleNamespace(returncode=process.returncode, stdout=first,
                                  manifest=json.loads((run_dir / "manifest.json").read_text()))
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return run_dir, before, interrupted, results_then, again


def read_csv(run_dir):
    from modula_ray.tune.report import read_trials

    return read_trials(run_dir)


def test_search_records_every_trial_and_installs_the_best_router(tuned):
    from modula_ray.compose import part_sha256

    run_dir, before, *_ = tuned
    rows = read_csv(run_dir)
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    completed = [r for r in rows if r["status"] == "completed"]
    best = min(completed, key=lambda r: r["val_loss"])
    assert [r["trial"] for r in rows if r["best"]] == [best["trial"]]
    for row in rows:  # each trial reported the evaluation package's metrics
        assert row["val_loss"] > 0 and 0 <= row["routing_accuracy"] <= 1 and row["load_balance"] > 0
        assert row["step"] <= row["steps"] and (row["status"] == "stopped" or row["step"] == row["steps"])

    manifest = json.loads((run_dir / "manifest.json").read_text())
    hp, router = manifest["router"]["hyperparameters"], manifest["router"]
    assert (hp["lr"], hp["temperature"], hp["top_k"], hp["steps"], hp["router_placement"]) == (
        best["lr"], best["temperature"], best["top_k"], best["steps"], best["router_placement"])
    assert manifest["experts"]["router_placement"] == best["router_placement"]
    assert manifest["experts"]["temperature"] == best["temperature"] and manifest["experts"]["top_k"] == best["top_k"]
    built = json.loads((Path(manifest["data"]["dir"]) / "datasets.json").read_text())["domains"]
    rows_of = {d: built[d]["splits"]["train"]["rows"] for d in ("math", "code", "general")}
    assert hp["data_weights"] == pytest.approx({**rows_of, "general": rows_of["general"] * best["data_weights.general"]})
    assert router["tuned"]["trial"] == best["trial"] and router["metrics"]["val_loss"] == best["val_loss"]
    replaced = router["tuned"]["before"]  # the pipeline's router, scored on the same rows before the search
    assert set(replaced) == {"val_loss", "routing_accuracy", "load_balance"} and replaced["val_loss"] > 0
    trial_router = run_dir / "tune" / "router" / f"trial_{best['trial']}" / "router"
    assert part_sha256(run_dir / "router") == part_sha256(trial_router) == router["sha256"]
    assert not (run_dir / "router.prev").exists() and not (run_dir / "router.new").exists()
    assert [r["event"] for r in manifest["ledger"]].count("tune:router") == len(completed)
    assert manifest["domains"] == before["domains"]  # the experts were not touched
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (run_dir / "config.yaml").read_text().startswith("# modula-ray tune router --run ")
    assert config["stages"]["router"]["lr"] == best["lr"] and config["experts"]["top_k"] == best["top_k"]
    # TensorBoard: Tune's events per trial, and each trial's per-step curves
    for row in rows:
        folder = run_dir / "tune" / "router" / f"trial_{row['trial']}"
        assert list(folder.glob("events.out.tfevents.*")) and list((folder / "steps").glob("events.out.tfevents.*"))


def test_the_installed_router_validates_as_its_trial_reported(tuned, ray_local):
    """The numbers Tune saw come from the evaluation package: recomputing them on the installed
    composition gives the best trial's last report."""
    from modula_ray.compose import load_composition
    from modula_ray.evaluation.validation import RouterValidation
    from modula_ray.train.task import StageTask

    run_dir = tuned[0]
    best = next(row for row in read_csv(run_dir) if row["best"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model, tokenizer = load_composition(run_dir)
    task = StageTask(key="check", stage="router", method=manifest["method"], domains=list(manifest["domains"]),
                     base_model="", experts={}, data_dir=manifest["data"]["dir"],
                     data_domains=list(manifest["domains"]) + ["general"], hparams={}, run_dir=str(run_dir),
                     max_length=512, validator_args=SPACE["validation"])
    metrics = RouterValidation(tokenizer, task)(model)
    for name in ("val_loss", "routing_accuracy", "load_balance"):
        assert metrics[name] == pytest.approx(best[name], rel=1e-4, abs=1e-5), name


def test_lm_eval_scores_the_tuned_composition(tuned):
    """``--model modula`` loads the run with the installed router (lineage and hashes checked) and
    scores what lm-eval's HFLM scores over ``load_composition``."""
    from tests.integration.test_eval import loss_of

    loss_of(tuned[0])


def test_tune_report_prints_the_table_and_writes_the_figures(tuned, capsys):
    from modula_ray.cli import main

    run_dir = tuned[0]
    assert main(["tune", "report", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert all(row["trial"] in printed for row in read_csv(run_dir)) and "<- best" in printed
    assert "the router before the search: val_loss" in printed
    for name in ("objective.png", "asha_curves.png"):
        assert (run_dir / "tune" / name).read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_search_resumes_to_exactly_num_samples_trials(tuned):
    """Ctrl-C after two trials ended stops the search with nothing installed; the same command again
    restores it: 4 trials in all, none twice, and the ended ones are not rerun."""
    run_dir, _, interrupted, results_then, again = tuned
    assert interrupted.returncode == 130, interrupted.stdout[-2000:]
    assert "search interrupted" in interrupted.stdout
    assert interrupted.manifest["router"].get("tuned") is None  # nothing installed
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "resuming the unfinished search" in again.stdout
    experiment = run_dir / "tune" / "router"
    rows = read_csv(run_dir)
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    assert all(r["status"] in ("completed", "stopped") for r in rows)
    assert sorted(p.name for p in experiment.glob("trial_*")) == sorted(f"trial_{r['trial']}" for r in rows)
    for trial, text in results_then.items():  # ended trials were kept, not trained again
        assert (experiment / f"trial_{trial}" / "result.json").read_text() == text
        assert f"[tune] {trial} " not in again.stdout
    assert json.loads((run_dir / "manifest.json").read_text())["router"]["tuned"]["trials"] == 4


@pytest.fixture
def bare_run(tiny_run, tmp_path):
    return copy_run(tiny_run[0], tmp_path / "run")


def _manifest_edit(run_dir, change):
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_bad_input_is_refused_before_anything_runs(bare_run, tmp_path, ray_local, capsys):
    from modula_ray.cli import main
    from modula_ray.errors import ArtifactError, ConfigError, ResourceUnavailableError
    from modula_ray.tune.search import tune_router

    space = space_file(tmp_path)
    with pytest.raises(ResourceUnavailableError, match=r"--max-concurrent 20: 20 trials x 1 worker\(s\) x "
                                                       r"\{'CPU': 0.5\}.*the cluster has \{CPU: 4"):
        tune_router(bare_run, space, max_concurrent=20)
    bad = tmp_path / "bad.yaml"
    bad.write_text(space.read_text().replace("top_k:", "top_kk:"))
    with pytest.raises(ConfigError, match="space.top_kk: unknown hyperparameter 'top_kk'; did you mean 'top_k'"):
        tune_router(bare_run, bad)
    bad.write_text(space.read_text().replace("- 2\n", "- 3\n"))  # top_k choices: null, 1, 3 > 2 routed
    with pytest.raises(ConfigError, match="space.top_k: 3 is not allowed.*the 2 routed experts"):
        tune_router(bare_run, bad)
    _manifest_edit(bare_run, lambda m: m["domains"]["code"].update(path=None))
    with pytest.raises(ArtifactError, match=r"no trained experts for \['code'\]"):
        tune_router(bare_run, space)
    assert main(["tune", "router", "--run", str(bare_run), "--space", str(space)]) == 2
    assert "no trained experts" in capsys.readouterr().err
    assert not (bare_run / "tune").exists()
