"""The tiny pipeline end to end on a real in-process Ray: three stages, stage 2 concurrent,
manifest and ledger, the routing table, re-runs, lineage checks, add-domain, the molora baseline
and the cost comparison."""
import json
import re
from pathlib import Path

import pytest
import torch

from modula_ray.compose import Manifest, load_composition
from modula_ray.config import PipelineConfig, load_config
from modula_ray.errors import ArtifactError, StageFailedError
from modula_ray.experts import inject, routing_weights, save_part
from modula_ray.models import load_base
from modula_ray.train.ledger import overlaps
from modula_ray.train.pipeline import add_domain, run_pipeline, run_stage
from tests.helpers import randomise_experts
from tests.integration.conftest import CONCURRENT, copy_run, digests, tiny_config
from tests.integration.faults import crash
from tests.integration.test_eval import loss_of

pytestmark = pytest.mark.slow
LEDGER_KEYS = {"stage", "domain", "trainable_params", "forward_params", "tokens", "flops", "fit_started_at",
               "fit_ended_at", "train_started_at", "train_ended_at", "train_s", "startup_s", "resource_s",
               "peak_mem_mb", "first_loss", "final_loss", "resumed_from_step", "engine", "nodes", "threads_per_worker",
               "scored_tokens"}
# Final losses of the tiny config with CONCURRENT (random tiny Llama, seed 0); CPU-deterministic.
# code and router moved at 0e962b8: the 2 code rows the right cut dropped are kept (their prompts cut).
PINNED_LOSS = {"universal": 6.2056, "math": 5.6994, "code": 5.7708, "router": 5.9375}
# (scored, processed) tokens of the same runs: the data, tokenizer and batch schedule fix them (at b797dde)
PINNED_TOKENS = {"universal": (792, 6095), "math": (4308, 57577), "code": (4402, 110781), "router": (366, 4916)}


def test_manifest_records_every_part(tiny_run, tiny_data):
    run_dir, manifest = tiny_run
    assert manifest["method"] == "modula_res"
    assert list(manifest["domains"]) == ["math", "code"]
    assert manifest["data"]["dir"] == str(tiny_data) and not (run_dir / "data").exists()  # the shared data, read in place
    datasets = json.loads((tiny_data / "datasets.json").read_text())
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
        assert record["threads_per_worker"] == 1  # 0.5 CPU: 1 torch thread
        assert (record["scored_tokens"], record["tokens"]) == PINNED_TOKENS[record["domain"] or record["stage"]]
        phases = record["startup_phases"]  # where the start-up went, timed in the worker: it adds up
        assert min(phases.values()) >= 0 and phases["ray_s"] > phases["first_step_s"]
        assert sum(phases.values()) == pytest.approx(record["startup_s"], abs=5e-3)
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
    """The routing weights a loaded composition reports are softmax(W_R x / tau) of every adapted
    layer's own input, averaged over tokens and layers (a plain reference from forward hooks)."""
    from modula_ray.experts import expert_layers

    run_dir, _ = tiny_run
    model, tokenizer = load_composition(run_dir)
    ids = tokenizer("What is 3 + 4?", return_tensors="pt").input_ids
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, path=path: inputs.setdefault(path, args[0]))
             for path, layer in expert_layers(model).items()]
    with torch.no_grad():
        logits = model(ids).logits
    for hook in hooks:
        hook.remove()
    weights = routing_weights(model)
    layers = expert_layers(model)
    assert list(weights) == ["math", "code"] and len(inputs) == len(layers) == 14
    reference = torch.stack([torch.softmax(inputs[path] @ layer.router.weight.T / layer.router.temperature, dim=-1)
                             .reshape(-1, 2).mean(dim=0) for path, layer in layers.items()]).mean(dim=0)
    assert list(weights.values()) == pytest.approx(reference.tolist(), abs=1e-6)
    assert abs(weights["math"] - 0.5) > 1e-4, "a trained router is not uniform"
    assert torch.isfinite(logits).all()
    for sub in ("universal", "experts-math", "experts-code", "router"):
        assert list((run_dir / "tensorboard" / sub).glob("events.out.tfevents.*")), sub
        assert f"[{sub.replace('experts-', 'experts/')}] step" in (run_dir / "logs" / f"{sub}.rank0.log").read_text()


def test_eval_routing_prints_and_saves_the_table(tiny_run, capsys):
    from modula_ray.cli import main

    run_dir, _ = tiny_run
    assert main(["eval", str(run_dir), "--suite", "routing", "--rows", "4"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
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
    assert "routing accuracy" in printed
    # Reference: a plain full forward per prompt (every position's logits), read as routing_weights
    # and own_expert_hits; routing_tables reads both from one forward with only the last logits.
    from modula_ray.data.build import split_file
    from modula_ray.data.formatting import prompt_ids
    from modula_ray.data.schema import read_split
    from modula_ray.evaluation.routing import captured_gates, own_expert_hits

    model, tokenizer = load_composition(run_dir)
    data_dir = Manifest.read(run_dir)["data"]["dir"]
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



def test_eval_measures_routing_on_domain_tokens_and_each_expert_alone(tiny_run):
    """``--suite heldout,routing,specialisation`` held to plain references: full forwards of prompt and
    response (every position's logits) for the domain-token measures, and the held-out loss per
    byte with and without an expert forced (item by item, the same as the mixture's)."""
    from modula_ray.cli import main
    from modula_ray.data.build import split_file
    from modula_ray.data.formatting import encode_example, shared_head_length
    from modula_ray.data.schema import read_split
    from modula_ray.evaluation.routing import captured_gates
    from modula_ray.evaluation.specialisation import forced_expert, response_nll_per_byte

    run_dir, _ = tiny_run
    assert main(["eval", str(run_dir), "--suite", "heldout,routing,specialisation", "--rows", "4"]) == 0
    on_tokens = json.loads((run_dir / "eval" / "routing.json").read_text())["layers"]["domain_tokens"]
    heldout = json.loads((run_dir / "eval" / "heldout.json").read_text())["domains"]
    assert set(heldout) == {"math", "code", "general"} and all(len(v["nll"]) == 4 for v in heldout.values())
    special = json.loads((run_dir / "eval" / "specialisation.json").read_text())
    assert set(on_tokens) == {"math", "code"} and special["experts"] == ["math", "code"]
    assert special["domains"] == ["math", "code", "general"] and set(special["own_is_best"]) == {"math", "code"}
    model, tokenizer = load_composition(run_dir)
    data_dir, head = Manifest.read(run_dir)["data"]["dir"], shared_head_length(tokenizer)
    split = lambda domain, name: read_split(split_file(data_dir, domain, name)).select(  # noqa: E731
        ["prompt", "response", "source", "meta"]).to_pylist()[:4]
    for index, domain in enumerate(["math", "code"]):
        hits = tokens = sequences = 0
        by_kind = {}
        with torch.no_grad(), captured_gates(model) as captured:
            for row in split(domain, "val"):
                captured.clear()
                model(torch.tensor([encode_example(tokenizer, row["prompt"], row["response"], 512).input_ids]))
                gates = torch.stack([calls[-1][0] for calls in captured.values()]).mean(dim=0)[head:]
                hits, tokens = hits + int((gates[:, index] > gates[:, 1 - index]).sum()), tokens + gates.shape[0]
                right = int(gates.mean(dim=0)[index] > gates.mean(dim=0)[1 - index])
                sequences += right
                by_kind.setdefault(json.loads(row["meta"])["generator"], []).append(right)  # reasoning-gym rows
        assert on_tokens[domain]["token_accuracy"] == pytest.approx(hits / tokens)
        assert on_tokens[domain]["sequence_accuracy"] == pytest.approx(sequences / 4)
        assert on_tokens[domain]["by_kind"] == {kind: {"rows": len(v), "sequence_accuracy": pytest.approx(sum(v) / len(v))}
                                                for kind, v in by_kind.items()}
        held_out = split(domain, "test")
        assert special["mixture"][domain] == pytest.approx(response_nll_per_byte(model, tokenizer, held_out, 512),
                                                           rel=1e-5)
        assert heldout[domain]["nll_per_byte"] == pytest.approx(special["mixture"][domain], rel=1e-5)
        with forced_expert(model, index):
            alone = response_nll_per_byte(model, tokenizer, held_out, 512)
        assert special["loss"][domain][domain] == pytest.approx(alone, rel=1e-5) != special["mixture"][domain]
        items = special["items"][domain]  # what the report's margin intervals resample
        assert special["own_expert"][domain] == domain and len(items["ids"]) == 4
        assert sum(items["nll"][domain]) / sum(items["bytes"]) == pytest.approx(alone, rel=1e-4)
        assert sum(items["mixture"]) / sum(items["bytes"]) == pytest.approx(special["mixture"][domain], rel=1e-4)


def test_rerun_does_nothing_unless_forced(tiny_run):
    run_dir, manifest = tiny_run
    before = digests(run_dir / "experts") | digests(run_dir / "universal") | digests(run_dir / "router")
    fits = sorted(p.name for p in (run_dir / "ray").iterdir())  # Ray Train makes a folder per fit here
    assert len(fits) == 4
    again = run_pipeline(tiny_config(*CONCURRENT), run_dir, command="pytest tiny")
    assert sorted(p.name for p in (run_dir / "ray").iterdir()) == fits, "a stage was trained again"
    assert again["ledger"] == manifest["ledger"]
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
    assert "finance" not in Manifest.read(run_dir)["domains"]


def test_a_different_base_model_is_refused(tiny_run, tmp_path):
    """Other weights, or the same weights with another tokenizer or chat template: another model."""
    run_dir = copy_run(tiny_run[0], tmp_path / "rebased")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["base_model"]) == {"name", "path", "sha256", "files_sha256"}
    for key, what in (("sha256", "config and weights"), ("files_sha256", "tokenizer, chat template")):
        changed = json.loads(json.dumps(manifest))
        changed["base_model"][key] = "0" * 64
        (run_dir / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(ArtifactError, match=rf"base model .*: its {what}.* hash to [0-9a-f]{{12}}\.\.\., the "
                                                r"composition was trained on 000000000000"):
            load_composition(run_dir)
    del manifest["base_model"]["files_sha256"]  # a run made before the files were recorded: weights alone
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    load_composition(run_dir)


def test_every_failed_stage2_group_is_reported(tiny_run, ray_local, tmp_path, monkeypatch):
    """Both stage-2 groups crash after step 1 with ``max_failures=0`` (no retry): each group's failure
    is named, with the worker's own cause and where its logs are, and the failed stage saves nothing."""
    run_dir = copy_run(tiny_run[0], tmp_path / "failing")
    experts_before = digests(run_dir / "experts")
    crash(monkeypatch, "experts", 1)
    config = tiny_config("max_failures=0")
    with pytest.raises(StageFailedError, match="2 of 2 worker groups failed") as info:
        run_stage(config, run_dir, "experts", force=True)
    assert set(info.value.failures) == {"experts/math", "experts/code"}
    assert "experts/math:" in str(info.value) and "experts/code:" in str(info.value)
    assert str(info.value).endswith(f"worker logs: {run_dir.resolve() / 'logs'}")
    for key, failure in info.value.failures.items():  # the worker's own failure (its process died), one line each
        assert f"\n  {key}: {failure.cause}\n" in str(info.value), str(info.value)
        assert re.match(r"\w+Error: \S", failure.cause) and "worker errors" not in failure.cause, failure.cause
        assert not failure.cause.startswith(("WorkerGroupError", "WorkerHealthCheckFailedError")), failure.cause
        assert re.match(rf"stage {key} \(.+\) failed: .+; worker logs: ", str(failure)), str(failure)
        # it died where it was told to, once (no retry: the marker would stop a second death)
        assert (run_dir / f".crashed-{key.replace('/', '-')}-step1").exists()
    assert digests(run_dir / "experts") == experts_before, "a failed stage saved a part"
    assert not any(state["done"] for key, state in Manifest.read(run_dir)["stages"].items() if key.startswith("experts/"))


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


def test_add_domain_swaps_the_run_in_whole_and_a_failed_one_leaves_it_as_it_was(tiny_run, tmp_path, monkeypatch):
    """Built beside the folder and swapped in: a reader polling it meanwhile never meets a manifest
    listing a domain its router was not trained for, nor a part that is missing; an add-domain that
    fails leaves every byte of the composition as it was, and no staging folder behind."""
    import threading

    from modula_ray.experts import method_class
    from modula_ray.train.task import AFTER_STEP_ENV

    run_dir = copy_run(tiny_run[0], tmp_path / "growing")
    kept = ("manifest.json", "config.yaml", "universal", "experts", "router")
    composition = lambda: {k: v for k, v in digests(run_dir).items() if k.split("/")[0] in kept}  # noqa: E731
    before = composition()
    crash(monkeypatch, "experts", 1)
    with pytest.raises(StageFailedError):
        add_domain("finance", run_dir, overrides=["max_failures=0"])
    assert composition() == before and sorted(p.name for p in tmp_path.iterdir()) == ["growing"]
    monkeypatch.delenv(AFTER_STEP_ENV)

    seen, wrong, stop = [], [], threading.Event()

    def read():  # until a read that began after add_domain returned: that one must see the new run
        while True:
            last = stop.is_set()
            try:
                manifest = Manifest.read(run_dir)
                routed = method_class(manifest["method"]).routed_names(list(manifest["domains"]))
                if manifest["router"]["routed"] != routed or not all(Path(p.path).is_dir() for p in manifest.parts()):
                    wrong.append(dict(manifest["domains"]))
                seen.append(list(manifest["domains"]))
            except (ArtifactError, OSError) as error:
                wrong.append(repr(error))
            if last:
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        add_domain("finance", run_dir)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert wrong == [] and ["math", "code"] in seen and seen[-1] == ["math", "code", "finance"], wrong[:3]
    assert Path(Manifest.read(run_dir)["data"]["dir"]) == Path(tiny_config().data.dir).resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["growing"]


def test_molora_add_domain_retrains_all_and_cost_compares(experiment, capsys):
    """The experiment's molora baseline (the same token budget as modula_res, DESIGN §7), before and
    after adding finance, against modula_res's add-domain: ``modula-ray cost``."""
    from modula_ray.cli import main

    _, out, *_ = experiment
    molora, molora_added, modula_added = (out / "seed0" / name for name in ("molora", "molora+finance",
                                                                            "modula_res+finance"))
    loss_of(molora)  # lm-eval's --model modula evaluates a molora run
    before, after = digests(molora / "experts"), digests(molora_added / "experts")
    for name in ("math/adapter.safetensors", "code/adapter.safetensors"):
        assert after[name] != before[name], "molora must retrain every expert"
    event = [r for r in Manifest.read(molora_added)["ledger"] if r["event"] == "add-domain:finance"]
    assert [(r["stage"], r["domain"]) for r in event] == [("joint", None)]

    assert main(["cost", str(modula_added), "--against", str(molora_added), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ratio = report["ratios"]["params_x_tokens_ratio"]
    added = [r for r in Manifest.read(modula_added)["ledger"] if r["event"] == "add-domain:finance"]
    assert report["add_domain"]["params_x_tokens"] == sum(r["trainable_params"] * r["tokens"] for r in added)
    assert report["baseline"]["params_x_tokens"] == sum(r["trainable_params"] * r["tokens"] for r in event)
    assert 0 < ratio < 1, "adding a domain to MoDULA must cost less than retraining molora"
    assert report["add_domain"]["resource_s"] == pytest.approx(sum(r["resource_s"] for r in added), abs=1e-6)
    assert report["ratios"]["resource_ratio"] > 0 and report["ratios"]["train_ratio"] > 0
    assert main(["cost", str(modula_added), "--against", str(molora_added)]) == 0
    text = capsys.readouterr().out
    assert "pluggability (params x tokens)" in text and "resource-seconds" in text


def test_lora_baseline_is_one_joint_stage(ray_local, tmp_path):
    manifest = run_pipeline(tiny_config("method=lora"), tmp_path / "lora")
    assert [(r["stage"], r["domain"], r["event"]) for r in manifest["ledger"]] == [("joint", None, "pipeline")]
    assert manifest["universal"]["path"] == "universal" and manifest["router"] is None
    assert list(manifest["domains"]) == ["math", "code"]
    assert all(entry["path"] is None and len(entry["data_sha256"]) == 64 for entry in manifest["domains"].values())
    assert manifest["ledger"][0]["trainable_params"] == 16384  # rank 8 on all 7 projections of 2 blocks
    model, tokenizer = load_composition(tmp_path / "lora")
    assert routing_weights(model(tokenizer("12 + 3", return_tensors="pt").input_ids) and model) == {}
    loss_of(tmp_path / "lora")  # lm-eval's --model modula evaluates a lora run
