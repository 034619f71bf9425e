"""``modula-ray experiment paper`` end to end on the tiny model: every part as a Ray task, the report
with its tables and figures, a rerun that recomputes nothing, a failed part that stops only its
dependents and is picked up by the next rerun; then ``modula-ray chat-tour`` over the result with
the openai client."""
import json
import math
import re

import pytest

from .conftest import JUDGED, digests

pytestmark = pytest.mark.slow


def test_every_part_runs_once_and_the_report_holds_the_papers_tables(experiment):
    config, out, code, serve_left = experiment
    assert code == 0
    assert serve_left == []  # the judge's Serve went down with the last judge part
    parts = {p.stem for p in (out / "parts").glob("*.json")}
    assert parts == {"base__eval", *(f"seed0__{m}__{k}" for m in ("molora", "modula_res")
                                     for k in ("train", "eval", "add", "add-eval")),
                     "seed0__modula_res__tune", "seed0__modula_res__tune-eval",
                     "seed0__molora__judge", "seed0__modula_res__judge"}
    report = (out / "report.md").read_text()
    for heading in ("Table 1: domain tasks", "Table 3: general capability", "Table 4: after adding finance",
                    "Table 5", "Cost (from each run's ledger", "Routing (Figure 3)", "The router searched with Ray Tune"):
        assert heading in report
    assert "Judge: tiny-llama at http://127.0.0.1:8000/v1" in report
    for row in ("| base model alone |", "| molora |", "| modula_res |", "| modula_res (tuned router) |",
                "| molora +finance |", "| modula_res +finance |"):
        assert row in report
    for figure in ("domain_avg.png", "domain_avg_added.png", "cost_quality.png", "routing_modula_res.png"):
        assert (out / figure).stat().st_size > 1000 and f"]({figure})" in report
    results = json.loads((out / "results.json").read_text())
    res = results["rows"]["modula_res"]["seeds"]["0"]
    assert set(res["routing_accuracy"]) == {"math", "code"} and all(0 <= v <= 1 for v in res["routing_accuracy"].values())
    assert res["avg"] == pytest.approx((res["modula_math"] + res["modula_code"] + res["modula_humaneval"]) / 3)
    # the optimizer share, against the manifests' ledgers read here: each trained run's every record, the
    # add-domain records of the +finance copies; the tiny config runs 1 worker of 1 thread per group
    ledgers = {name: json.loads((out / "seed0" / name / "manifest.json").read_text())["ledger"]
               for name in ("molora", "modula_res", "molora+finance", "modula_res+finance")}
    assert {r["threads_per_worker"] for ledger in ledgers.values() for r in ledger} == {1}
    counted = [r for name, ledger in ledgers.items() for r in ledger if "+" not in name or r["event"] != "pipeline"]
    share = results["optimizer_share"]
    assert share["thread_s"] == pytest.approx(sum(r["train_s"] * r["num_workers"] for r in counted), abs=0.1)
    assert share["share"] == pytest.approx(share["thread_s"] / (share["span_s"] * share["cpus"]), abs=1e-4)
    assert 0 < share["share"] < 1 and f"Optimizer steps took {share['thread_s']:,.0f} CPU-thread-seconds" in report


def test_held_out_losses_item_by_item_their_intervals_the_specialisation_and_the_curves(experiment):
    """eval.heldout_rows 4: every model on the same test items, one run's item held to a full forward of
    its composition; the report's paired intervals, interference and specialisation; every stage's
    validation curve (validate_rows 2) back from TensorBoard."""
    import torch

    from modula_ray.compose import load_composition
    from modula_ray.data.build import split_file
    from modula_ray.data.formatting import encode_example
    from modula_ray.data.schema import read_split

    _, out, *_ = experiment
    base = json.loads((out / "base" / "heldout.json").read_text())
    assert set(base["domains"]) == {"math", "code", "finance", "general"}
    runs = {name: json.loads((out / "seed0" / name / "eval" / "heldout.json").read_text())
            for name in ("molora", "modula_res", "molora+finance", "modula_res+finance")}
    assert set(runs["modula_res"]["domains"]) == {"math", "code", "general"}
    assert set(runs["modula_res+finance"]["domains"]) == {"math", "code", "finance", "general"}
    for held in runs.values():
        for domain, entry in held["domains"].items():
            assert entry["ids"] == base["domains"][domain]["ids"] and len(entry["ids"]) == 4
            assert entry["bytes"] == base["domains"][domain]["bytes"]
            assert entry["nll_per_byte"] == pytest.approx(sum(entry["nll"]) / sum(entry["bytes"]), rel=1e-4)
    model, tokenizer = load_composition(out / "seed0" / "modula_res")
    first = read_split(split_file(out / "data", "math", "test")).to_pylist()[0]
    example = encode_example(tokenizer, first["prompt"], first["response"], runs["modula_res"]["max_length"])
    ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels[1:])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    scored = labels != -100
    plain = -float(logp[scored].gather(1, labels[scored][:, None]).sum())
    assert runs["modula_res"]["domains"]["math"]["nll"][0] == pytest.approx(plain, rel=1e-4)

    report = (out / "report.md").read_text()
    for heading in ("Held-out response loss", "Differences the intervals resolve", "Interference: the old domains",
                    "Specialisation: each routed expert alone"):
        assert heading in report
    held = json.loads((out / "results.json").read_text())["heldout"]
    assert held["items_per_domain"] == 4 and held["resamples"] == 200
    for label, losses in held["loss"].items():
        for interval in losses.values():
            assert interval["low"] <= interval["value"] <= interval["high"]
    assert held["loss"]["base model alone"]["finance"]["value"] == pytest.approx(
        base["domains"]["finance"]["nll_per_byte"], abs=1e-4)
    assert set(held["vs_base"]) == {"molora", "modula_res", "molora +finance", "modula_res +finance"}
    assert held["vs_compare"]["modula_res +finance"]["finance"]["against"] == "molora +finance"
    interference = held["interference"]["modula_res"]
    assert interference["value"] == pytest.approx(interference["after"] - interference["before"], abs=1e-4)
    special = held["specialisation"]["modula_res"]
    assert special["experts"] == ["math", "code"] and special["domains_with_expert"] == 2
    for domain, margin in special["margin"].items():  # own expert minus the other, paired on the items
        other = "code" if domain == "math" else "math"
        assert (margin["own"], margin["against"]) == (domain, other)
        assert margin["value"] == pytest.approx(special["loss"][domain][domain] - special["loss"][domain][other],
                                                abs=1e-4)
        assert margin["low"] <= margin["value"] <= margin["high"]
    assert set(special["margin"]) == {"math", "code"} and "| margin [95% interval] |" in report
    # eval.mc_rows 4: general MMLU before adding finance, finance after; the base model on both
    assert set(json.loads((out / "base" / "mc.json").read_text())["domains"]) == {"finance", "general_mmlu"}
    for name, domains in (("modula_res", {"general_mmlu"}), ("modula_res+finance", {"finance"})):
        mc = json.loads((out / "seed0" / name / "eval" / "mc.json").read_text())["domains"]
        assert set(mc) == domains and all(len(d["ids"]) == 4 for d in mc.values())
    choice = json.loads((out / "results.json").read_text())["multiple_choice"]
    assert choice["items"] == {"finance": 4, "general_mmlu": 4} and "Multiple-choice accuracy" in report
    assert choice["vs_compare"]["calibrated_accuracy"]["modula_res +finance"]["finance"]["against"] == "molora +finance"
    curves = json.loads((out / "results.json").read_text())["curves"]
    assert {"universal/val_loss", "experts/val_loss", "router/val_loss"} <= set(curves["modula_res"]["0"])
    assert "joint/val_loss" in curves["molora"]["0"] and "joint/val_loss" in curves["molora +finance"]["0"]
    for figure in ("heldout_loss.png", "val_loss_curves.png"):
        assert (out / figure).stat().st_size > 1000 and f"]({figure})" in report


def test_the_same_token_budget_and_the_add_domain_cost_against_a_molora_retrain(experiment):
    _, out, *_ = experiment
    ledger = {m: json.loads((out / "seed0" / m / "manifest.json").read_text())["ledger"] for m in ("molora", "modula_res")}
    # steps: molora joint (2 + 2) x 2 = 8; modula_res universal 2 + experts 2 x 2 + router 2 = 8
    assert [r["stage"] for r in ledger["molora"]] == ["joint"]
    # modula_res trains stage 2 together (tiny-experiment.yaml): one record, each expert in the manifest
    assert sorted(r["stage"] for r in ledger["modula_res"]) == ["experts", "router", "universal"]
    [together] = [r for r in ledger["modula_res"] if r["stage"] == "experts"]
    manifest = json.loads((out / "seed0" / "modula_res" / "manifest.json").read_text())
    assert together["domains"] == ["math", "code"] and together["domain"] is None
    assert {manifest["stages"][f"experts/{d}"]["run_name"] for d in ("math", "code")} == {together["run_name"]}
    for domain in ("math", "code"):
        mine = manifest["domains"][domain]["metrics"]
        assert mine["examples"] > 0 and 0 < mine["tokens"] < together["tokens"] and mine["loss"] > 0
    assert sum(manifest["domains"][d]["metrics"]["tokens"] for d in ("math", "code")) == together["tokens"]
    added = {m: [r for r in json.loads((out / "seed0" / f"{m}+finance" / "manifest.json").read_text())["ledger"]
                 if r["event"] == "add-domain:finance"] for m in ("molora", "modula_res")}
    assert [r["stage"] for r in added["molora"]] == ["joint"]            # retrained from scratch
    assert sorted(r["stage"] for r in added["modula_res"]) == ["experts", "router"]  # one expert + the router
    fraction = sum(r["trainable_params"] * r["tokens"] for r in added["modula_res"]) / sum(
        r["trainable_params"] * r["tokens"] for r in added["molora"])
    costs = json.loads((out / "results.json").read_text())["costs"]
    assert costs["modula_res"]["add"]["fraction_of_molora"]["params_x_tokens"] == pytest.approx(fraction)
    assert costs["molora"]["add"]["fraction_of_molora"]["params_x_tokens"] == pytest.approx(1.0)
    assert 0 < fraction < 1
    # route_init_rows=2 (tiny-experiment.yaml): 2 rows per routed label fitted before each router stage
    # (res's general rows have none), their forwards counted in the router's FLOPs
    for record, labels in (([r for r in ledger["modula_res"] if r["stage"] == "router"][0], 2),
                           ([r for r in added["modula_res"] if r["stage"] == "router"][0], 3)):
        fit = record["route_init"]
        assert fit["rows"] == 2 * labels and 0 < fit["tokens"] <= 32 * fit["rows"] < 32 * fit["input_tokens"]
        assert fit["route_nll_after"] < math.log(labels)  # better than uniform gates on the rows fitted
        assert record["flops"] > 2 * record["forward_params"] * fit["input_tokens"]
    assert all(r.get("route_init") is None for r in ledger["molora"])
    # the runs without the added domain are left as they were: the copies took finance
    assert "finance" not in json.loads((out / "seed0" / "modula_res" / "manifest.json").read_text())["domains"]


def test_a_rerun_recomputes_nothing_and_a_failed_part_stops_only_its_dependents(experiment, capsys):
    from modula_ray.cli import main

    config, out, *_ = experiment
    kept = {name: digests(out / "seed0" / name) for name in ("molora", "modula_res")}
    markers = {p.name: p.read_bytes() for p in (out / "parts").glob("*.json")}
    for name in ("seed0__modula_res__add.json", "seed0__modula_res__add-eval.json"):
        (out / "parts" / name).unlink()
    finance = out / "data" / "finance"
    finance.rename(finance.with_name("finance.away"))  # the add-domain part cannot find its data
    try:
        assert main(["experiment", "paper", "--config", str(config), "--out", str(out), *JUDGED]) == 1
    finally:
        finance.with_name("finance.away").rename(finance)
    printed = capsys.readouterr()
    assert "11 of 13 parts already done; 2 to run" in printed.out
    assert re.search(r"FAILED seed0/modula_res/add: .*finance", printed.out)
    assert "start  seed0/modula_res/add-eval" not in printed.out
    assert "1 part(s) failed and 1 were skipped" in printed.err
    assert main(["experiment", "paper", "--config", str(config), "--out", str(out), *JUDGED]) == 0
    printed = capsys.readouterr().out
    assert "11 of 13 parts already done; 2 to run" in printed and "done   seed0/modula_res/add-eval" in printed
    assert {name: digests(out / "seed0" / name) for name in ("molora", "modula_res")}.keys() == kept.keys()
    for name, digest in kept.items():  # the trained runs were not touched (their eval/ only by evaluation)
        now = digests(out / "seed0" / name)
        assert {k: v for k, v in now.items() if not k.startswith(("eval/", "logs/"))} == {
            k: v for k, v in digest.items() if not k.startswith(("eval/", "logs/"))}
    assert all((out / "parts" / name).read_bytes() == body for name, body in markers.items()
               if "modula_res__add" not in name)
    invocations = json.loads((out / "invocations.json").read_text())
    assert [len(i["ran"]) for i in invocations] == [13, 0, 2] and invocations[1]["failed"] == ["seed0/modula_res/add"]


def test_a_judge_that_does_not_start_fails_the_judge_parts_alone(experiment):
    import io

    import ray

    from modula_ray.experiment.config import load_experiment
    from modula_ray.experiment.parts import plan
    from modula_ray.experiment.runner import run_parts

    config, out, *_ = experiment
    judged = sorted((out / "parts").glob("*__judge.json"))
    kept = {p: p.read_bytes() for p in judged}
    for marker in judged:
        marker.unlink()
    exp = load_experiment(config, ["eval.judge_limit=1", "eval.judge_model=no-such-model"])
    stream = io.StringIO()
    try:
        result = run_parts(plan(exp), exp, out, config, stream=stream)
    finally:
        for marker, body in kept.items():
            marker.write_bytes(body)
    assert result["ran"] == [] and sorted(result["failed"]) == ["seed0/modula_res/judge", "seed0/molora/judge"]
    assert all(m.startswith("the judge 'no-such-model' did not start on Ray Serve") for m in result["failed"].values())
    assert stream.getvalue().count("FAILED seed0/") == 2 and "11 of 13 parts already done" in stream.getvalue()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE" in a["name"]]


def test_another_experiment_into_the_same_folder_is_refused(experiment):
    from modula_ray.cli import main

    config, out, *_ = experiment
    assert main(["experiment", "paper", "--config", str(config), "--out", str(out), "--set", "steps_per_part=3"]) == 2


def test_the_chat_tour_answers_one_question_per_domain_with_routing_weights(experiment, capsys):
    from modula_ray.cli import main

    _, out, *_ = experiment
    assert main(["chat-tour", str(out / "seed0" / "modula_res+finance"), "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    for domain in ("math", "code", "finance"):
        assert f"[{domain}] " in printed
    weights = re.findall(r"routing: ((?:\w+ \d\.\d\d\s*)+)", printed)
    assert len(weights) == 3
    for line in weights:
        values = dict(re.findall(r"(\w+) (\d\.\d\d)", line))
        assert set(values) == {"math", "code", "finance"}
        assert sum(map(float, values.values())) == pytest.approx(1.0, abs=0.02)
