"""Configs: typed errors naming field and file, dotted overrides, YAML that starts with its command."""
import pytest
import yaml

from modula_ray.config import ExpertsConfig, apply_overrides, dump_config, from_dict, load_config
from modula_ray.errors import ConfigError


@pytest.mark.parametrize("data, field", [
    ({"domain_rank": 0}, "domain_rank"), ({"dropout": "high"}, "dropout"),
    ({"top_k": 0}, "top_k"), ({"colour": "red"}, "colour"), ({"target_modules": "q_proj"}, "target_modules"),
])
def test_bad_values_name_the_field_and_file(tmp_path, data, field):
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(ExpertsConfig, path)
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "experts.yaml"
    path.write_text(dump_config(ExpertsConfig(domain_rank=4), "modula-ray train --config experts.yaml"))
    assert path.read_text().startswith("# modula-ray train --config experts.yaml\n")
    config = load_config(ExpertsConfig, path, ["top_k=2", "temperature=0.5"])
    assert (config.domain_rank, config.top_k, config.temperature) == (4, 2, 0.5)
    assert config.layer_kwargs()["top_k"] == 2
    assert from_dict(ExpertsConfig, {"universal_alpha": 8}).universal_alpha == 8.0
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["top_k"])
