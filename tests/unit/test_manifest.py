"""The run manifest (``compose.Manifest``, DESIGN §2): created, parts recorded with their hashes,
the ledger and stages kept, a router installed, written atomically and read back with its checks."""
import json
import re
from pathlib import Path

import pytest

from modula_ray.compose import Manifest, PartRef, part_sha256
from modula_ray.config import PipelineConfig, load_config, to_dict
from modula_ray.errors import ArtifactError
from modula_ray.experts import save_part
from tests.helpers import TINY_CONFIG, modula_model, saved_run

BASE = {"name": "tiny-llama", "path": "/models/tiny", "sha256": "ab" * 32}


@pytest.fixture(scope="module")
def config():
    return load_config(PipelineConfig, TINY_CONFIG)


@pytest.fixture(scope="module")
def model(tiny, config):
    return modula_model(tiny[0], config)


@pytest.fixture
def run(tmp_path, model, config) -> Manifest:
    return saved_run(tmp_path / "run", model, config)


def on_disk(run_dir) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())


def test_a_new_manifest_holds_the_documented_fields(tmp_path, config):
    manifest = Manifest.create(tmp_path, method="modula_res", base_model=BASE, experts=to_dict(config.experts))
    manifest.save()
    saved = on_disk(tmp_path)
    assert list(saved) == ["schema_version", "run_id", "method", "base_model", "target_modules", "experts", "domains",
                           "universal", "router", "stages", "ledger"]
    assert re.fullmatch(r"[0-9a-f]{10}", saved["run_id"])
    assert saved == {"schema_version": 1, "run_id": saved["run_id"], "method": "modula_res", "base_model": BASE,
                     "target_modules": list(config.experts.target_modules), "experts": to_dict(config.experts),
                     "domains": {}, "universal": None, "router": None, "stages": {}, "ledger": []}
    assert Manifest.create(tmp_path, method="lora", base_model=BASE, experts=to_dict(config.experts))["run_id"] \
        != saved["run_id"]


def test_every_part_is_recorded_with_path_sha256_data_hash_and_metrics(run, config):
    saved = on_disk(run.run_dir)
    sha = {name: json.loads((run.run_dir / name / "config.json").read_text())["sha256"]
           for name in ("universal", "experts/math", "experts/code", "router")}
    assert len(set(sha.values())) == 4
    assert saved["data"] == {"dir": str(run.run_dir / "data"), "size": "tiny", "seed": 0}
    assert saved["universal"] == {"path": "universal", "sha256": sha["universal"], "metrics": {"loss": 6.0}}
    assert saved["domains"] == {  # the train split hashes of the data index, in router order
        "math": {"path": "experts/math", "sha256": sha["experts/math"], "metrics": {"loss": 5.0}, "data_sha256": "0" * 63 + "1"},
        "code": {"path": "experts/code", "sha256": sha["experts/code"], "metrics": {"loss": 5.0}, "data_sha256": "0" * 63 + "2"}}
    assert saved["router"] == {"path": "router", "sha256": sha["router"], "metrics": {"loss": 4.0},
                               "routed": ["math", "code"], "hyperparameters": {"lr": 0.01}}
    assert run.parts() == [PartRef("universal", str(run.run_dir / "universal")),
                           PartRef("domain", str(run.run_dir / "experts/math"), "math"),
                           PartRef("domain", str(run.run_dir / "experts/code"), "code"),
                           PartRef("router", str(run.run_dir / "router"))]
    run.check_lineage()  # every expert was saved over this universal


def test_a_data_only_domain_has_no_part(run):
    run.record_domain("general", None, {})  # e.g. lora: its domains are only its data
    assert run["domains"]["general"] == {"path": None, "metrics": {}, "data_sha256": "0" * 63 + "3"}
    assert [ref.domain for ref in run.parts() if ref.part == "domain"] == ["math", "code"]


def test_domains_keep_router_order_whatever_order_they_finish_in(run):
    run.record_domain("code", run.run_dir / "experts" / "code", {"loss": 1.0})  # code finishes last ...
    run.record_domain("general", None, {})
    assert list(run["domains"]) == ["math", "code", "general"]
    run.order_domains(["code", "math"])  # ... the router's order decides
    assert list(run["domains"]) == ["code", "math", "general"]
    run.save()
    assert list(on_disk(run.run_dir)["domains"]) == ["code", "math", "general"]


def test_the_ledger_appends_each_run_once(run):
    run.add_ledger([{"run_name": "a", "resource_s": 1.0}, {"run_name": "b", "resource_s": 2.0}])
    run.add_ledger([{"run_name": "b", "resource_s": 2.0}, {"run_name": "c", "resource_s": 3.0}])
    run.save()
    assert [(r["run_name"], r["resource_s"]) for r in on_disk(run.run_dir)["ledger"]] == [("a", 1.0), ("b", 2.0),
                                                                                          ("c", 3.0)]


def test_a_stage_gets_a_new_run_name_for_each_attempt(run):
    run_id = run["run_id"]
    assert run.start_stage("experts/math", "experts-math", force=False) == f"modula-{run_id}-experts-math-a1"
    assert run["stages"]["experts/math"] == {"attempt": 1, "done": False, "run_name": f"modula-{run_id}-experts-math-a1"}
    assert run.start_stage("experts/math", "experts-math", force=False) == f"modula-{run_id}-experts-math-a1"  # resumed
    run.finish_stage("experts/math", "pipeline")
    state = run["stages"]["experts/math"]
    assert state["done"] is True and state["event"] == "pipeline" and state["finished_at"] > 0
    assert run.start_stage("experts/math", "experts-math", force=False) == f"modula-{run_id}-experts-math-a2"
    assert run.start_stage("experts/math", "experts-math", force=True) == f"modula-{run_id}-experts-math-a3"


def test_installing_a_router_records_it_its_settings_and_the_search(run, tiny, config, tmp_path):
    folder = save_part(modula_model(tiny[0], config, seed=2), "router", tmp_path / "trial" / "router")
    tuned_config = load_config(PipelineConfig, TINY_CONFIG, ["experts.top_k=1", "experts.temperature=2.0"])
    experts_before = dict(run["experts"])
    assert part_sha256(folder) != run["router"]["sha256"]
    record = {"run_name": "trial-1", "event": "tune:router", "resource_s": 3.0}
    for _ in range(2):  # installing the same search again adds no cost
        run.install_router(folder, experts=tuned_config.experts, routed=["math", "code"], metrics={"val_loss": 2.5},
                           hyperparameters={"lr": 0.02}, tuned={"search": "router", "trial": "t1"}, ledger=[record])
    saved = on_disk(run.run_dir)  # install_router saves
    assert saved["experts"] == {**experts_before, "top_k": 1, "temperature": 2.0}
    assert saved["router"] == {"path": "../trial/router", "sha256": part_sha256(folder), "metrics": {"val_loss": 2.5},
                               "routed": ["math", "code"], "hyperparameters": {"lr": 0.02},
                               "tuned": {"search": "router", "trial": "t1"}}
    assert saved["ledger"] == [record]
    assert {k: saved["stages"]["router"][k] for k in ("attempt", "done", "event", "trial")} == {
        "attempt": 1, "done": True, "event": "tune:router", "trial": "t1"}


def test_a_manifest_round_trips_through_the_disk(run):
    run.add_ledger([{"run_name": "a", "flops": 12}])
    run.save()
    again = Manifest.read(run.run_dir)
    assert again == run and list(again) == list(run) and list(again["domains"]) == ["math", "code"]
    assert dict(again) == on_disk(run.run_dir)
    assert not [k for k in on_disk(run.run_dir) if k.startswith("_")]
    assert not list(run.run_dir.glob(".manifest.json.*"))  # the atomic write left no temporary file


def test_a_manifest_changes_only_through_its_methods(run):
    with pytest.raises(TypeError, match="does not support item assignment"):
        run["router"] = None


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("{not json", r"not valid JSON \(Expecting property name"),
    ("[1, 2]", "holds a JSON list, not a run manifest object"),
    (json.dumps({"schema_version": 1, "method": "lora"}), r"missing keys \['run_id', 'base_model', 'experts'"),
    ("SCHEMA", "schema_version 2 is not 1"),
])
def test_a_bad_manifest_is_an_artifact_error_naming_the_file(run, content, message):
    path = run.run_dir / "manifest.json"
    if content is None:
        path.unlink()
    elif content == "SCHEMA":
        path.write_text(json.dumps({**on_disk(run.run_dir), "schema_version": 2}))
    else:
        path.write_text(content)
    with pytest.raises(ArtifactError, match=message) as error:
        Manifest.read(run.run_dir)
    assert error.value.path == str(path) and str(error.value).startswith(f"{path}: ")


def test_a_domain_without_data_is_an_artifact_error(tmp_path, run, config):
    bare = Manifest.create(tmp_path, method="modula_res", base_model=BASE, experts=to_dict(config.experts))
    with pytest.raises(ArtifactError, match="records no data folder, so domain 'math' has no data hash") as error:
        bare.record_domain("math", None, {})
    assert error.value.path == str(tmp_path / "manifest.json")
    with pytest.raises(ArtifactError, match=r"has no domain 'finance'; built: \['code', 'general', 'math'\]") as error:
        run.record_domain("finance", None, {})
    assert error.value.path == str(run.run_dir / "data" / "datasets.json")


@pytest.mark.parametrize("field, path, message", [
    ("router", "/etc", "must be a path relative to the run folder"),
    ("router", "../elsewhere/router", "leads outside the run folder"),
    ("universal", "experts/../../x", "leads outside the run folder"),
    ("domain", "LINK", "leads outside the run folder"),
    ("router", "", "must be a path relative")])
def test_a_part_path_must_stay_inside_the_run_folder(run, tmp_path, field, path, message):
    """What a writer of manifest.json could otherwise point a loader at (issue 25)."""
    fields = on_disk(run.run_dir)
    if path == "LINK":
        (run.run_dir / "escape").symlink_to(tmp_path, target_is_directory=True)
        path = "escape/experts/math"
    if field == "domain":
        fields["domains"]["math"]["path"] = path
    else:
        fields[field]["path"] = path
    (run.run_dir / "manifest.json").write_text(json.dumps(fields))
    with pytest.raises(ArtifactError, match=message):
        Manifest.read(run.run_dir).parts()


def test_a_manifest_read_once_is_the_one_loaded(run):
    """Hot-plug reads the bytes once, for both its digest and the load (no second read to race)."""
    raw = (run.run_dir / "manifest.json").read_bytes()
    (run.run_dir / "manifest.json").write_text("{}")  # rewritten after the read: the read bytes still rule
    assert Manifest.read(run.run_dir, raw)["run_id"] == json.loads(raw)["run_id"]
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Manifest.read(run.run_dir, b"{nope")


def test_a_run_built_in_a_staging_folder_records_its_final_data_folder(run, tmp_path):
    staging, final = str(run.run_dir), str(tmp_path / "final")
    run._fields["data"]["dir"] = staging + "/data"
    run.moved(staging, final)
    assert run["data"]["dir"] == final + "/data"
    run._fields["data"]["dir"] = "/shared/data"  # outside the run: left alone
    run.moved(staging, final)
    assert run["data"]["dir"] == "/shared/data"
