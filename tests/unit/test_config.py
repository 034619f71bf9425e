"""Configs: typed errors naming field and file, dotted overrides, YAML that starts with its command,
each method's own settings class, and the check against the base model before any worker starts."""
import pytest
import yaml

from modula_ray.config import (PipelineConfig, apply_overrides, dump_config, experts_config, from_dict, load_config,
                               to_dict)
from modula_ray.errors import ConfigError
from modula_ray.experts import LinearExpertsConfig, config_keys
from modula_ray.experts.methods.mode import ModeConfig
from tests.helpers import TINY_CONFIG


@pytest.mark.parametrize("experts, field", [
    ({"domain_rank": 0}, "experts.domain_rank"), ({"dropout": "high"}, "experts.dropout"),
    ({"top_k": 0}, "experts.top_k"), ({"colour": "red"}, "experts.colour"),
    ({"target_modules": "q_proj"}, "experts.target_modules"),
    ({"mode_num_blocks": 0}, "experts.mode_num_blocks"),  # a MoDE key in a modula_res run: checked by ModeConfig
    ({"top_k": 3}, "experts.top_k"),                      # modula_res over 2 domains routes 2 experts
])
def test_bad_values_name_the_field_and_file(tmp_path, experts, field):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"method": "modula_res", "domains": ["math", "code"], "experts": experts}))
    with pytest.raises(ConfigError) as info:
        load_config(PipelineConfig, path)
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_an_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'domain_rank'") as info:
        from_dict(PipelineConfig, {"experts": {"domian_rank": 4}})
    assert info.value.field == "experts.domian_rank"


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "pipeline.yaml"
    config = from_dict(PipelineConfig, {"experts": {"domain_rank": 4}})
    path.write_text(dump_config(config, "modula-ray train --config pipeline.yaml"))
    assert path.read_text().startswith("# modula-ray train --config pipeline.yaml\n")
    loaded = load_config(PipelineConfig, path, ["experts.top_k=2", "experts.temperature=0.5"])
    assert (loaded.experts.domain_rank, loaded.experts.top_k, loaded.experts.temperature) == (4, 2, 0.5)
    assert from_dict(PipelineConfig, {"experts": {"universal_alpha": 8}}).experts.universal_alpha == 8.0
    assert from_dict(PipelineConfig, to_dict(loaded)) == loaded
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["top_k"])


def test_each_method_reads_its_own_settings_class():
    """The run's ``experts`` is its method's config class: MoDE's spans are not beside the LoRA ranks."""
    res = load_config(PipelineConfig, TINY_CONFIG)
    mode = load_config(PipelineConfig, TINY_CONFIG, ["method=mode", "experts.mode_blocks=[[0, 1]]"])
    lora = load_config(PipelineConfig, TINY_CONFIG, ["method=lora"])
    assert type(res.experts) is LinearExpertsConfig and res.experts.domain_rank == 4  # tiny.yaml's
    assert type(mode.experts) is ModeConfig and mode.experts.mode_blocks == [[0, 1]]
    assert type(lora.experts).__name__ == "LoraConfig"
    assert not {"mode_blocks", "mode_num_blocks", "mode_block_layers"} & set(config_keys(LinearExpertsConfig))
    assert not {"universal_rank", "domain_rank", "dropout", "router_placement"} & set(config_keys(ModeConfig))
    # tiny.yaml's LoRA ranks serve the LoRA methods; the MoDE run's saved config holds only MoDE's settings
    assert set(to_dict(mode)["experts"]) == set(config_keys(ModeConfig))
    assert mode.experts.router_placement == "block"  # one gate per MoDE block, not a setting
    with pytest.raises(ConfigError, match="method 'lora' has no router") as info:
        load_config(PipelineConfig, TINY_CONFIG, ["method=lora", "experts.top_k=1"])
    assert info.value.field == "experts.top_k"


def test_a_manifest_mapping_of_every_method_s_keys_still_builds_the_method_s_settings():
    """A manifest written before the split held every method's keys (and a tuned MoDE router
    records router_placement): each method takes its own."""
    union = {"target_modules": ["q_proj"], "universal_rank": 8, "domain_rank": 4, "universal_alpha": 16,
             "domain_alpha": 8, "dropout": 0.0, "top_k": None, "temperature": 0.5, "router_bias": False,
             "router_placement": "block", "mode_blocks": [[0, 2]], "mode_num_blocks": 3, "mode_block_layers": 2}
    res = experts_config("modula_res", union)
    mode = experts_config("mode", union)
    assert (res.router_placement, res.domain_rank, res.temperature) == ("block", 4, 0.5)
    assert (mode.mode_blocks, mode.temperature) == ([[0, 2]], 0.5)


def test_mode_spans_past_the_base_model_are_refused_before_any_worker(monkeypatch, tmp_path):
    """``--set method=mode`` on tiny.yaml: 3 default blocks of 2 layers do not fit the 2-layer tiny
    model. The driver reads the base model (meta device, no weights) and names the field and value;
    run_pipeline does so before it connects to Ray."""
    from modula_ray.train import pipeline

    config = load_config(PipelineConfig, TINY_CONFIG, ["method=mode"])
    with pytest.raises(ConfigError) as info:
        config.check_base_model()
    assert info.value.field == "experts.mode_num_blocks"
    assert "mode_num_blocks x mode_block_layers = 3 x 2 exceeds the model's 2 layers" in str(info.value)

    def no_ray(*args, **kwargs):
        raise AssertionError("run_pipeline reached Ray before checking the settings")

    monkeypatch.setattr(pipeline, "connect_ray", no_ray)
    with pytest.raises(ConfigError, match="3 x 2 exceeds the model's 2 layers"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_target_modules_the_base_model_lacks_are_refused_by_the_driver():
    config = load_config(PipelineConfig, TINY_CONFIG, ["experts.target_modules=[q_proj, c_attn]"])
    with pytest.raises(ConfigError, match=r"no nn.Linear named \['c_attn'\] in LlamaForCausalLM") as info:
        config.check_base_model()
    assert info.value.field == "experts.target_modules"
    load_config(PipelineConfig, TINY_CONFIG, ["method=mode", "experts.mode_blocks=[[0, 1], [1, 2]]"]
                ).check_base_model()  # fits: one block per layer


def test_the_check_on_a_cold_cache_materialises_real_weights(monkeypatch, tmp_path):
    """The first run on a machine materialises the base model inside ``check_base_model``: outside
    the meta device (a clean-clone CI run once failed with "Cannot copy out of meta tensor")."""
    from safetensors.torch import load_file

    monkeypatch.setenv("MODULA_RAY_CACHE", str(tmp_path / "cache"))
    load_config(PipelineConfig, TINY_CONFIG).check_base_model()
    weights = load_file(str(next((tmp_path / "cache" / "models" / "tiny-llama").glob("*.safetensors"))))
    assert weights and all(t.device.type == "cpu" and t.numel() > 0 for t in weights.values())
