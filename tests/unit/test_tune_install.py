"""Installing a tuned router (``tune/install.py``) without Ray: built in a copy of the run and swapped
in whole, so a failure at any point leaves the run byte for byte as it was; and ``recover_router``,
which repairs an install that the earlier protocol's crash cut short: the manifest's router entry
names the router folder in place, complete, and ``config.yaml`` agrees with it."""
import hashlib
import shutil

import pytest

from modula_ray.compose import Manifest, part_sha256
from modula_ray.config import PipelineConfig, dump_config, load_config
from modula_ray.errors import ArtifactError
from modula_ray.experts import read_part, save_part
from modula_ray.fileio import atomic_write_text
from modula_ray.tune.install import install_router, recover_router
from tests.helpers import TINY_CONFIG, modula_model, saved_run

LEFTOVERS = ("router.prev", "router.new", "config.yaml.new")


class Crash(Exception):
    """The process dies here."""


@pytest.fixture(scope="module")
def config():
    return load_config(PipelineConfig, TINY_CONFIG)


@pytest.fixture(scope="module")
def tuned_config():
    return load_config(PipelineConfig, TINY_CONFIG, ["experts.top_k=1", "experts.temperature=2.0"])


@pytest.fixture
def run_dir(tmp_path, tiny, config):
    """A trained run with its config.yaml; returns the folder."""
    manifest = saved_run(tmp_path / "run", modula_model(tiny[0], config, seed=1), config)
    atomic_write_text(manifest.run_dir / "config.yaml", dump_config(config, "pytest train"))
    return manifest.run_dir


@pytest.fixture
def trial_router(tmp_path, tiny, config):
    return save_part(modula_model(tiny[0], config, seed=2), "router", tmp_path / "trial" / "router")


def install(run_dir, source, config):
    return install_router(run_dir, source, config=config, command="pytest tune", hyperparameters={"lr": 0.02},
                          metrics={"val_loss": 2.5}, tuned={"search": "router", "trial": "t1"},
                          ledger=[{"run_name": "trial-t1", "event": "tune:router", "resource_s": 3.0}])


def snapshot(run_dir) -> dict[str, str]:
    """sha256 of every file of the run folder, by relative path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_consistent(run_dir, router_sha256: str, config_command: str) -> Manifest:
    """The router folder in place is complete, is the one the manifest records, and config.yaml
    comes from the same install; nothing staged is left."""
    manifest = Manifest.read(run_dir)
    read_part(run_dir / "router")  # complete: its tensors match its config.json
    assert part_sha256(run_dir / "router") == manifest["router"]["sha256"] == router_sha256
    assert (run_dir / "config.yaml").read_text().startswith(f"# {config_command}\n")
    assert [name for name in LEFTOVERS if (run_dir / name).exists()] == []
    return manifest


def test_an_install_replaces_the_router_and_records_it(run_dir, trial_router, tuned_config):
    old = part_sha256(run_dir / "router")
    new = part_sha256(trial_router)
    assert old != new
    install(run_dir, trial_router, tuned_config)
    manifest = assert_consistent(run_dir, new, "pytest tune")
    assert manifest["router"]["tuned"] == {"search": "router", "trial": "t1"}
    assert (manifest["experts"]["top_k"], manifest["experts"]["temperature"]) == (1, 2.0)
    assert "top_k: 1" in (run_dir / "config.yaml").read_text()


def test_recover_is_a_no_op_on_a_clean_run(run_dir, trial_router, tuned_config):
    before = snapshot(run_dir)
    assert recover_router(run_dir) is None
    assert snapshot(run_dir) == before
    install(run_dir, trial_router, tuned_config)
    after = snapshot(run_dir)
    assert after != before
    assert recover_router(run_dir) is None
    assert snapshot(run_dir) == after


@pytest.mark.parametrize("when", ["before the manifest is written", "after the manifest is written"])
def test_a_crash_inside_the_install_leaves_the_run_as_it_was(run_dir, trial_router, tuned_config, monkeypatch,
                                                             when):
    before, old = snapshot(run_dir), part_sha256(run_dir / "router")
    commit = Manifest.install_router

    def crash(self, *args, **kwargs):
        if when.startswith("after"):
            commit(self, *args, **kwargs)
        raise Crash

    monkeypatch.setattr(Manifest, "install_router", crash)
    with pytest.raises(Crash):
        install(run_dir, trial_router, tuned_config)
    assert snapshot(run_dir) == before and recover_router(run_dir) is None  # nothing to repair
    assert sorted(p.name for p in run_dir.parent.iterdir() if p.name.startswith(".")) == []  # no staging left
    assert_consistent(run_dir, old, "pytest train")
    monkeypatch.undo()
    install(run_dir, trial_router, tuned_config)  # and the install can simply run again
    assert_consistent(run_dir, part_sha256(trial_router), "pytest tune")


def test_a_crash_between_the_two_renames_brings_the_previous_router_back(run_dir, trial_router):
    before = snapshot(run_dir)
    old = Manifest.read(run_dir)["router"]["sha256"]
    (run_dir / "router").rename(run_dir / "router.prev")  # step 2 half done: no router/ at all
    shutil.copytree(trial_router, run_dir / "router.new")
    atomic_write_text(run_dir / "config.yaml.new", "# pytest tune\n")
    assert recover_router(run_dir) == "undone"
    assert_consistent(run_dir, old, "pytest train")
    assert snapshot(run_dir) == before


def test_a_truncated_trial_router_is_refused_before_anything_is_replaced(run_dir, trial_router, tuned_config):
    before = snapshot(run_dir)
    tensors = next(p for p in trial_router.iterdir() if p.suffix == ".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-16])
    with pytest.raises(ArtifactError, match="does not match config.json .*: the file is truncated or was changed"):
        install(run_dir, trial_router, tuned_config)
    assert recover_router(run_dir) is None and snapshot(run_dir) == before  # nothing was replaced
