"""The router search file: validation against the run, Tune domains, and what a trial's config becomes."""
from pathlib import Path

import pytest
import yaml

from modula_ray.config import PipelineConfig, load_config
from modula_ray.errors import ConfigError
from modula_ray.tune.space import load_spec, trial_config, tune_space

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ["math", "code", "general"]
RUN = load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml")  # modula_res over math and code: 2 routed


def write(tmp_path, space=None, **sections) -> Path:
    data = {"search": {"num_samples": 4, "max_concurrent": 2}, **sections}
    data["space"] = space if space is not None else {"lr": {"loguniform": [0.001, 0.05]}}
    path = tmp_path / "space.yaml"
    path.write_text("# modula-ray tune router --run RUN --space space.yaml\n" + yaml.safe_dump(data))
    return path


def spec_of(tmp_path, space=None, run=RUN, **sections):
    return load_spec(write(tmp_path, space, **sections), run)


def test_the_default_search_file_fits_the_demo_run():
    demo = load_config(PipelineConfig, ROOT / "jobs/configs/demo.yaml")
    spec = load_spec(ROOT / "jobs/configs/tune-router.yaml", demo)
    assert spec.search.metric == "val_loss" and spec.search.mode == "min" and spec.scheduler.name == "asha"
    assert {"lr", "temperature", "top_k", "aux_loss_coef", "route_loss_coef", "route_init_rows", "warmup_steps", "steps",
            "router_placement", "data_weights.general"} == set(spec.space)
    assert spec.max_steps(demo.stages.router.steps) == 48 and spec.expected_trials() == spec.search.num_samples


@pytest.mark.parametrize("space, field, message", [
    ({"temprature": {"uniform": [0.5, 2.0]}}, "space.temprature", "did you mean 'temperature'"),
    ({"data_weights.finance": 2.0}, "space.data_weights.finance", "unknown hyperparameter"),
    ({"top_k": {"choice": []}}, "space.top_k", "non-empty list"),
    ({"top_k": {"choice": [None, 1, 3]}}, "space.top_k", r"3 is not allowed: top_k=3 must be in 1\.\.2"),
    ({"top_k": 0}, "space.top_k", "not allowed: must be >= 1"),
    ({"route_init_rows": {"choice": [0, -4]}}, "space.route_init_rows", "-4 is not allowed: must be int >= 0"),
    ({"steps": {"uniform": [8, 16]}}, "space.steps", "choice, grid or randint"),
    ({"router_placement": {"choice": ["layer", "row"]}}, "space.router_placement",
     r"'row' is not allowed: must be one of \['layer', 'block'\]"),
    ({"lr": {"loguniform": [0, 0.1]}}, "space.lr", "low > 0"),
    ({"lr": {"uniform": [0.1, 0.01]}}, "space.lr", "low < high"),
    ({"lr": {"normal": [0, 1]}}, "space.lr", "one key of"),
    ({"temperature": -1.0}, "space.temperature", "-1.0 is not allowed: must be > 0"),
    ({"temperature": "hot"}, "space.temperature", "'hot' is not allowed: must be float"),
])
def test_bad_spaces_name_the_hyperparameter_and_the_file(tmp_path, space, field, message):
    with pytest.raises(ConfigError, match=message) as caught:
        spec_of(tmp_path, space)
    assert caught.value.field == field and caught.value.source == str(tmp_path / "space.yaml")


def test_a_hyperparameter_the_method_does_not_read_is_unknown(tmp_path):
    mode = load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml", ["method=mode"])
    path = write(tmp_path, {"router_placement": {"choice": ["layer", "block"]}})
    load_spec(path, RUN)
    with pytest.raises(ConfigError, match="unknown hyperparameter 'router_placement'"):  # mode's gates sit per block
        load_spec(path, mode)


def test_method_settings_are_checked_by_the_method_s_config_class(tmp_path):
    """top_k against the run's routed experts: MoDE routes the backbone too (3 over 2 domains)."""
    mode = load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml", ["method=mode"])
    path = write(tmp_path, {"top_k": {"choice": [None, 3]}})
    load_spec(path, mode)
    with pytest.raises(ConfigError, match=r"top_k=3 must be in 1\.\.2 \(the 2 routed experts\)") as caught:
        load_spec(path, RUN)
    assert caught.value.field == "space.top_k"


@pytest.mark.parametrize("sections, field", [
    ({"search": {"metric": "accuracy"}}, "search.metric"),
    ({"search": {"algorithm": "hyperopt"}}, "search.algorithm"),
    ({"search": {"max_concurrent": 0}}, "search.max_concurrent"),
    ({"scheduler": {"name": "pbt"}}, "scheduler.name"),
    ({"search": {"algorithm": "grid"}, "space": {"lr": {"uniform": [0.01, 0.1]}}}, "space.lr"),
    ({"search": {"algorithm": "optuna"}, "space": {"lr": {"grid": [0.01, 0.1]}}}, "search.algorithm"),
    ({"trial": {"num_workers": 0}}, "trial.num_workers"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_settings_name_the_field(tmp_path, sections, field):
    space = sections.pop("space", None)
    with pytest.raises(ConfigError) as caught:
        spec_of(tmp_path, space, **sections)
    assert caught.value.field == field


def test_command_line_counts_win_and_grids_multiply(tmp_path):
    path = write(tmp_path, {"lr": {"grid": [0.01, 0.02, 0.03]}, "top_k": {"choice": [None, 1]}})
    spec = load_spec(path, RUN, num_samples=2, max_concurrent=1)
    assert (spec.search.num_samples, spec.search.max_concurrent) == (2, 1)
    assert spec.expected_trials() == 6
    grid = load_spec(path, RUN, num_samples=1)
    grid.search.algorithm = "grid"
    assert grid.expected_trials() == 6  # every choice is a grid too
    assert spec.fingerprint() == load_spec(path, RUN, num_samples=2,
                                           max_concurrent=3).fingerprint()  # concurrency is not the search
    assert spec.fingerprint() != grid.fingerprint()


def test_tune_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = spec_of(tmp_path, {"lr": {"loguniform": [0.001, 0.1]}, "temperature": {"uniform": [0.5, 2.0]},
                              "top_k": {"choice": [None, 2]}, "steps": {"randint": [4, 9]}, "warmup_steps": 2,
                              "router_placement": {"grid": ["layer", "block"]}})
    space = tune_space(spec)
    assert isinstance(space["lr"], Float) and isinstance(space["lr"].get_sampler(), Float._LogUniform)
    assert isinstance(space["temperature"], Float) and isinstance(space["top_k"], Categorical)
    assert isinstance(space["steps"], Integer) and space["warmup_steps"] == 2
    assert space["router_placement"] == {"grid_search": ["layer", "block"]}
    assert spec.max_steps(20) == 8


def test_a_trial_config_is_the_run_config_with_the_sample_applied(tmp_path):
    base = load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml")
    spec = spec_of(tmp_path, {"lr": 0.02, "data_weights.general": {"uniform": [0.5, 1.5]}},
                   trial={"num_workers": 1, "resources_per_worker": {"CPU": 0.25}}, validation={"every": 2})
    sample = {"lr": 0.02, "temperature": 0.7, "top_k": 1, "router_placement": "block", "aux_loss_coef": 0.3,
              "warmup_steps": 3, "steps": 6, "data_weights.general": 0.5}
    config = trial_config(base, spec, sample, {"math": 32, "code": 40, "general": 20}, DOMAINS)
    router = config.stages.router
    assert (router.lr, router.aux_loss_coef, router.warmup_steps, router.steps) == (0.02, 0.3, 3, 6)
    assert (config.experts.temperature, config.experts.top_k, config.experts.router_placement) == (0.7, 1, "block")
    assert router.data_weights == {"math": 32.0, "code": 40.0, "general": 10.0}
    assert router.scaling.resources_per_worker == {"CPU": 0.25} and router.log_every == 2
    assert config.stages.experts == base.stages.experts and base.stages.router.lr == 0.01  # nothing else moves
    unweighted = trial_config(base, spec_of(tmp_path, {"lr": 0.02}), {"lr": 0.02}, {}, DOMAINS)
    assert unweighted.stages.router.data_weights is None


def test_the_default_space_converts_to_optuna_distributions():
    """search.algorithm: optuna (TPE) takes the same space; Optuna is pinned, so this runs offline."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from ray.tune.search.optuna import OptunaSearch

    demo = load_config(PipelineConfig, ROOT / "jobs/configs/demo.yaml")
    spec = load_spec(ROOT / "jobs/configs/tune-router.yaml", demo)
    spec.search.algorithm = "optuna"
    converted = dict(OptunaSearch.convert_search_space(tune_space(spec)))
    assert set(converted) == set(spec.space)
    assert isinstance(converted["lr"], FloatDistribution) and converted["lr"].log
    assert isinstance(converted["top_k"], CategoricalDistribution) and None in converted["top_k"].choices
