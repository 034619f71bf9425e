"""The experiment's contract without Ray: the token budget, the plan of parts, the files it reads,
and the report's arithmetic (mean ± std over seeds, the noise rule, the add-domain fraction)."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from modula_ray.errors import ConfigError
from modula_ray.experts import method_class
from modula_ray.experiment.config import (EvalSettings, ExperimentConfig, TuneSettings, check_same_experiment,
                                          load_experiment, retrain_overrides)
from modula_ray.experiment.parts import Part, plan
from modula_ray.experiment.runner import admit, tune_cpus

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "jobs" / "configs" / "paper-smollm2.yaml"
TOUR = ROOT / "jobs" / "configs" / "demo-tour.yaml"
TINY_EXPERIMENT = ROOT / "jobs" / "configs" / "tiny-experiment.yaml"


@pytest.mark.parametrize("n", [2, 4])
def test_every_method_gets_the_same_steps_and_adding_a_domain_costs_what_the_paper_says(n):
    exp = ExperimentConfig(steps_per_part=8, domains=["math", "code", "medicine", "ecommerce"][:n])
    for method in exp.methods:
        steps = exp.budget(method, n)
        total = sum(steps[stage] * (n if stage == "experts" else 1) for stage in method_class(method).stage_plan)
        assert total == (n + 2) * 8, (method, steps)
    assert exp.budget("molora", n) == {"joint": (n + 2) * 8, "router": 8}
    assert exp.budget("modula_res", n) == {"universal": 8, "experts": 8, "router": 8}
    assert exp.budget("mode", n) == {"experts": 8, "joint": 16, "router": 8}
    # adding a domain: lora / molora retrain on n + 1 domains; the others train an expert and the router
    assert retrain_overrides(exp, "lora") == [f"stages.joint.steps={(n + 3) * 8}"]
    assert retrain_overrides(exp, "modula_flan") == [] and retrain_overrides(exp, "mode") == []


def test_the_plan_orders_each_part_after_what_it_needs():
    exp = ExperimentConfig(seeds=[0, 1])
    parts = plan(exp)
    keys = [p.key for p in parts]
    assert len(keys) == len(set(keys))
    for index, part in enumerate(parts):
        assert all(keys.index(need) < index for need in part.needs), part
    assert "seed1/modula_res/tune" in keys and "seed1/lora/tune" not in keys
    assert {p.run for p in parts if p.key.startswith("seed0/mode/")} == {"seed0/mode", "seed0/mode+finance"}
    assert not any(p.kind == "judge" for p in parts)  # judge_limit 0
    with_judge = plan(ExperimentConfig(seeds=[0, 1], eval=EvalSettings(judge_limit=2, judge_seeds=[1])))
    assert sorted(p.key for p in with_judge if p.kind == "judge") == [f"seed1/{m}/judge" for m in sorted(exp.methods)]
    # per seed: 5 x (train, eval, add, add-eval) + 2 x (tune, tune-eval); plus the base model once
    assert len(parts) == 1 + 2 * (5 * 4 + 2 * 2)
    searched_once = plan(ExperimentConfig(seeds=[0, 1, 2], tune=TuneSettings(seeds=[0], evaluate=False)))
    assert sorted(p.key for p in searched_once if p.kind == "tune") == ["seed0/modula_flan/tune", "seed0/modula_res/tune"]


def test_a_running_search_keeps_its_trials_cpus_from_evaluation_parts():
    """A search of 2 trials at once over the paper's router stage holds 2 x 1 CPU; on 3 CPUs one
    evaluation fits beside it, not two."""
    exp = load_experiment(PAPER, ["tune={methods: [modula_res], space: tune-router-paper.yaml, max_concurrent: 2}"])
    assert tune_cpus(exp, PAPER, "modula_res") == 2
    search = Part("seed2/modula_res/tune", "tune", "seed2/modula_res-tuned", "modula_res", 2)
    train = Part("seed2/mode/train", "train", "seed2/mode", "mode", 2)
    evals = [Part(f"seed{s}/lora/eval", "eval", f"seed{s}/lora", "lora", s) for s in range(3)]
    need = lambda p: {"tune": 2, "eval": 1}.get(p.kind, 0)  # noqa: E731
    assert admit([*evals], [search], slots=4, total_cpus=3, need=need) == evals[:1]
    assert admit([search, train, *evals], [], slots=4, total_cpus=3, need=need) == [search, train, evals[0]]
    assert admit([*evals], [], slots=4, total_cpus=3, need=need) == evals  # no search: every CPU
    assert admit([*evals], [evals[0], evals[1], evals[2]], slots=4, total_cpus=3, need=need) == []
    assert admit([evals[0]], [], slots=4, total_cpus=0.5, need=need) == evals[:1]  # alone, it always starts
    assert admit([train, *evals], [], slots=2, total_cpus=3, need=need) == [train, evals[0]]


def test_the_shipped_files_load_the_paper_experiment_powered_and_the_tour_small():
    paper, tour = load_experiment(PAPER), load_experiment(TOUR)
    assert paper.methods == ["lora", "molora", "modula_flan", "modula_res", "mode"] and len(paper.seeds) >= 2
    assert paper.eval.heldout_rows >= 128 and paper.eval.specialisation_rows and paper.eval.suites == []
    assert paper.eval.mc_rows >= 200
    assert "data.size=full" in paper.overrides and paper.steps_per_part > tour.steps_per_part
    assert tour.methods == ["molora", "modula_res"] and tour.tune is None and tour.seeds == [0]
    assert tour.steps_per_part == 5 and tour.eval.limit == 6 and tour.eval.suites == ["domain", "general"]
    assert tour.eval.judge_limit == 0 and tour.eval.heldout_rows == 0
    assert sorted(p.key for p in plan(tour) if p.kind in ("eval", "base")) == [
        "base/eval", "seed0/modula_res/add-eval", "seed0/molora/add-eval"]  # the tour: the five-domain runs
    tiny = load_experiment(TINY_EXPERIMENT)
    assert len(plan(tiny)) == 11 and tiny.tune.max_concurrent == 1
    for path in (PAPER, TOUR, TINY_EXPERIMENT):
        assert path.read_text().startswith("# python jobs/experiment.py paper --config ")


@pytest.mark.parametrize("text, field", [
    ("methods: [lora, molra]", "methods[1]"),
    ("add_domain: math", "add_domain"),
    ("tune: {methods: [molora]}", "tune.methods"),
    ("methods: [lora, molora]\ntune: {methods: [modula_res]}", "tune.methods"),
    ("eval: {suites: [general]}", "eval.suites"),
    ("seeds: [0, 0]", "seeds"),
    ("compare_to: mode\nmethods: [lora]\ntune: null", "compare_to"),
    ("extends: nowhere.yaml", "extends"),
    ("steps_per_part: 0", "steps_per_part"),
    ("eval: {dtype: float16}", "eval.dtype"),
    ("eval: {mc_rows: -1}", "eval.mc_rows"),
])
def test_a_bad_experiment_file_names_the_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_experiment(path)
    assert error.value.field == field and str(path) in str(error.value)


def test_an_experiment_that_extends_itself_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_experiment(tmp_path / "a.yaml")


def test_a_rerun_may_change_the_seeds_but_not_the_experiment():
    from modula_ray.config import to_dict

    saved = to_dict(ExperimentConfig())
    check_same_experiment(saved, ExperimentConfig(seeds=[0, 1, 2, 3], max_parallel=1), "DIR")
    with pytest.raises(ConfigError, match="steps_per_part") as error:
        check_same_experiment(saved, ExperimentConfig(steps_per_part=4), "DIR/experiment.yaml")
    assert error.value.field == "steps_per_part"


def _run(folder: Path, *, domain: dict, general: float, ledger: list[dict], routing: dict | None = None) -> None:
    (folder / "eval").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"ledger": ledger}))
    suites = {"domain": {"composition": domain}, "general": {"composition": {"modula_general": {"acc": general}}}}
    (folder / "eval" / "results.json").write_text(json.dumps({"suites": suites}))
    if routing:
        gates = {key: [0.5, 0.5] for key in ("first", "middle", "last")}
        layers = {"experts": list(routing), "layers": {"first": 0, "middle": 1, "last": 2},
                  "domains": {d: {"accuracy": a, **gates} for d, a in routing.items()}}
        (folder / "eval" / "routing.json").write_text(json.dumps({"layers": layers}))


def _record(event, params, tokens, resource_s=10.0):
    return {"event": event, "stage": "joint", "trainable_params": params, "tokens": tokens, "scored_tokens": tokens // 4,
            "flops": 6 * params * tokens,
            "train_started_at": 0.0, "train_ended_at": resource_s, "train_s": resource_s, "fit_started_at": 0.0,
            "fit_ended_at": resource_s + 5,
            "startup_s": 5.0, "resource_s": resource_s}


def test_the_report_gives_mean_and_std_over_seeds_and_calls_small_differences_noise(tmp_path):
    from modula_ray.experiment.report import write_experiment_report

    exp = ExperimentConfig(methods=["molora", "modula_res"], domains=["math", "medicine"], seeds=[0, 1, 2],
                           tune=None, compare_to="molora", eval=EvalSettings(limit=8))
    scores = {"molora": [(0.25, 0.50), (0.25, 0.50), (0.25, 0.50)],   # Avg. 37.5 every seed
              "modula_res": [(0.50, 0.50), (0.625, 0.625), (0.75, 0.75)]}  # Avg. 50.0, 62.5, 75.0
    for method, per_seed in scores.items():
        for seed, (math_score, medicine) in enumerate(per_seed):
            for suffix, params in (("", 100), ("+finance", 40 if method == "modula_res" else 200)):
                domain = {"modula_math": {"score": math_score}, "modula_medicine": {"acc_norm": medicine},
                          "modula_finance": {"acc_norm": 0.5}, "modula_domain_loss": {"nll_per_byte": 1.0 + seed}}
                ledger = [_record("pipeline", 100, 1000)] + ([_record("add-domain:finance", params, 1000)] if suffix else [])
                _run(tmp_path / f"seed{seed}" / f"{method}{suffix}", domain=domain, general=0.3, ledger=ledger,
                     routing={"math": 0.5 + 0.1 * seed, "medicine": 0.4}
                     if method == "modula_res" else None)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "results.json").write_text(json.dumps({"suites": {
        "domain": {"modula_math": {"score": 0.0}, "modula_medicine": {"acc_norm": 0.25}, "modula_finance": {"acc_norm": 0.25}},
        "general": {"modula_general": {"acc": 0.3}}}}))
    report = write_experiment_report(exp, tmp_path, {}).read_text()
    assert "| modula_res | 62.5 ± 12.5 | 62.5 ± 12.5 | 62.5 ± 12.5 | 2.000 ± 1.000 |" in report
    assert "| molora | 25.0 | 50.0 | 37.5 | 2.000 ± 1.000 |" in report
    assert "| base model alone | 0.0 | 25.0 | 12.5 | — |" in report
    # modula_res - molora = 25 points; noise: 2 sqrt(se_res^2 + se_molora^2) with se_res = 12.5 / sqrt(3)
    # (seeds) and se_molora its test items' binomial error over 8 items per task (larger than its seed std 0)
    results = json.loads((tmp_path / "results.json").read_text())
    verdict = next(v for v in results["verdicts"] if v.startswith("- modula_res against molora"))
    assert "higher by 25.0 points" in verdict
    assert any("molora against the base model: higher" in v for v in results["verdicts"])
    assert results["costs"]["modula_res"]["add"]["fraction_of_molora"]["params_x_tokens"] == pytest.approx(0.2)
    assert "| modula_res | 4.000e+04 |" in report and "| 20.0% |" in report and "| 37.3% |" in report
    # 1,000 tokens in a 10 s window of 1 worker: 100 tokens/s per worker, beside train s, resource-s and wall
    assert "| train s (workers, summed) | tokens/s per worker | resource-s |" in report
    assert "| molora | 100 | 1,000 | 25% | 1.000e+05 | 0.0 | 10 | 100 | 10 | 15 |" in report  # 250 of 1,000 scored
    assert results["costs"]["molora"]["train"]["tokens_per_s_per_worker"] == pytest.approx(100.0)
    assert "| modula_res | prompt, every token | 0.60 ± 0.10 | 0.40 | — |" in report  # routing accuracy per domain
    assert "62.5 ± 12.5 → 62.5 ± 12.5" in report  # old-domain Avg. before and after adding finance
    added = [v for v in results["verdicts"] if "+finance against" in v]
    assert len(added) == 3 and any(v.startswith("- modula_res +finance against molora +finance: higher") for v in added)
    drawn = {p["label"]: (p["resource_s"], p["avg_pct"]) for p in results["cost_quality"]}  # every evaluated row
    assert drawn == {"molora": (10.0, 37.5), "modula_res": (10.0, 62.5),
                     "molora +finance": (20.0, pytest.approx(125 / 3)), "modula_res +finance": (20.0, pytest.approx(175 / 3)),
                     "base model": (0.0, 12.5), "base model +finance": (0.0, pytest.approx(50 / 3))}
    # the tour evaluates only the runs with finance: its seeds and verdicts come from those
    for folder in tmp_path.glob("seed*/*"):
        if "+" not in folder.name:
            shutil.rmtree(folder / "eval")
    report = write_experiment_report(exp, tmp_path, {}).read_text()
    assert report.startswith("# Paper comparison at small scale (3 seeds)") and "nothing evaluated yet" not in report
    assert "No run was evaluated before adding finance" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["verdicts"]) == 3
    assert [p["label"] for p in results["cost_quality"]] == ["molora +finance", "modula_res +finance",
                                                             "base model +finance"]
    assert "![routing, modula_res +finance seed 0](routing_modula_res.png)" in report


def test_the_optimizer_share_counts_each_fit_once_with_its_workers_and_threads(tmp_path):
    """A +finance run is a copy of its trained run: its pipeline records are the trained run's
    and count once; its add-domain records count; workers and threads multiply the window."""
    from modula_ray.experiment.collect import ledger_costs
    from modula_ray.experiment.report import optimizer_share

    two_workers = {**_record("pipeline", 100, 1000, resource_s=10.0), "num_workers": 2}  # 20 worker-s, 1 thread
    two_threads = {**_record("add-domain:finance", 40, 500, resource_s=5.0), "threads_per_worker": 2}  # 10 thread-s
    _run(tmp_path / "trained", domain={}, general=0.3, ledger=[two_workers])
    _run(tmp_path / "added", domain={}, general=0.3, ledger=[two_workers, two_threads])
    costs = {name: ledger_costs(tmp_path / name) for name in ("trained", "added")}
    assert costs["trained"]["pipeline"]["worker_s_sum"] == 20.0 and costs["trained"]["pipeline"]["thread_s_sum"] == 20.0
    assert costs["added"]["add-domain:finance"]["worker_s_sum"] == 5.0
    assert costs["added"]["add-domain:finance"]["thread_s_sum"] == 10.0
    rows = {"molora": {"kind": "trained", "costs": {0: costs["trained"]}},
            "molora +finance": {"kind": "added", "costs": {0: costs["added"]}},
            "molora (tuned router)": {"kind": "tuned", "costs": {0: costs["trained"]}}}  # a copy too: not counted
    share = optimizer_share(rows, span_s=100.0, cpus=2)
    assert share == {"thread_s": 30.0, "span_s": 100.0, "cpus": 2, "share": 0.15}
    assert optimizer_share(rows, span_s=0.0, cpus=2) is None  # nothing ran yet


def test_a_one_point_difference_on_eight_items_is_within_noise():
    from modula_ray.experiment.report import Noise

    noise = Noise(8, {})
    se = noise.se(None, {"modula_math": 0.5}, ["modula_math"])
    assert se == pytest.approx((0.25 / 8) ** 0.5)  # q = (4 + 1) / 10 = 0.5
    assert Noise.verdict(0.01, se, se).startswith("within noise")
    assert Noise.verdict(0.9, se, se).startswith("higher by 90.0 points")


def test_the_cost_figure_draws_each_point_it_is_given(tmp_path):
    from modula_ray.evaluation.report import cost_quality_plot

    points = [("a", 120.0, 0.25, 0.05), ("b", 40.5, 0.125, 0.0), ("base", 0.0, 0.1, 0.0)]
    drawn = cost_quality_plot(points, tmp_path / "plots" / "cost.png")
    assert drawn == [("a", 120.0, 25.0), ("b", 40.5, 12.5), ("base", 0.0, pytest.approx(10.0))]
    assert (tmp_path / "plots" / "cost.png").stat().st_size > 1000


def test_the_tours_figures_show_its_runs_evaluated_only_after_adding_finance(tmp_path):
    """`make demo` evaluates only the +finance runs (``eval.before_adding: false``): the cost figure
    holds both of them and the base model over the same five domains, and the routing figure is
    the +finance run's (the figure once showed the base model alone)."""
    from modula_ray.experiment.figures import write_figures

    exp = load_experiment(TOUR)
    events = ("pipeline", "add-domain:finance")
    cost = lambda *seconds: {0: {e: {"resource_s": s} for e, s in zip(events, seconds)}}  # noqa: E731
    rows = {m: {"kind": "trained", "method": m, "variant": "", "seeds": {}, "costs": cost(100.0)} for m in exp.methods}
    rows["molora +finance"] = {"kind": "added", "method": "molora", "variant": "+finance",
                               "seeds": {0: {"avg": 0.20}}, "costs": cost(100.0, 150.0)}
    rows["modula_res +finance"] = {"kind": "added", "method": "modula_res", "variant": "+finance",
                                   "seeds": {0: {"avg": 0.25, "routing_accuracy": {"math": 0.5}}},
                                   "costs": cost(80.0, 30.0)}
    data = {"rows": rows, "base": {"avg": 0.05}, "base_added": {"avg": 0.10}}
    layers = {"experts": ["math", "finance"], "layers": {"first": 0, "middle": 15, "last": 29},
              "domains": {"math": {"accuracy": 0.5, **{k: [0.5, 0.5] for k in ("first", "middle", "last")}}}}
    (tmp_path / "seed0" / "modula_res+finance" / "eval").mkdir(parents=True)
    (tmp_path / "seed0" / "modula_res+finance" / "eval" / "routing.json").write_text(json.dumps({"layers": layers}))
    figures, drawn = write_figures(exp, tmp_path, data)
    assert drawn == [("molora +finance", 250.0, 20.0), ("modula_res +finance", 110.0, 25.0),
                     ("base model +finance", 0.0, 10.0)]
    assert list(figures) == ["after adding finance", "cost against quality", "routing, modula_res +finance seed 0"]
    assert all(path.stat().st_size > 1000 for path in figures.values())


def test_the_time_parts_ran_leaves_out_the_gap_between_two_runs_of_the_command():
    from modula_ray.experiment.report import timing

    records = {"a": {"started_at": 0.0, "ended_at": 10.0, "wall_s": 10.0, "kind": "train"},
               "b": {"started_at": 5.0, "ended_at": 12.0, "wall_s": 7.0, "kind": "eval"},   # overlaps a
               "c": {"started_at": 100.0, "ended_at": 103.0, "wall_s": 3.0, "kind": "train"}}  # a later run
    assert timing(records) == (15.0, {"train": 13.0, "eval": 7.0})
