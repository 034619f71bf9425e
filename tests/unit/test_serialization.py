"""Parts on disk (DESIGN §2): round trips, strict checks, atomic writes, PEFT export."""
import json
import os

import pytest
import torch

from modula_ray.errors import ArtifactError
from modula_ray.experts import export_peft, inject, load_part, save_part, set_stage
from modula_ray.experts.serialization import TENSORS_FILE
from modula_ray.models import tiny_model

from tests.helpers import ids, randomise_experts


def composed(method="modula_res", domains=("math", "code"), seed=0):
    model, tokenizer = tiny_model()
    inject(model, method, list(domains))
    randomise_experts(model, seed)
    return model, tokenizer


@pytest.mark.parametrize("method", ["modula_res", "modula_flan", "molora"])
def test_round_trip_every_part_gives_identical_logits(method, tmp_path):
    source, tokenizer = composed(method)
    parts = [("domain", "math"), ("domain", "code"), ("router", None)]
    if method != "molora":
        parts.insert(0, ("universal", None))
    for part, domain in parts:
        save_part(source, part, tmp_path / (domain or part), domain=domain)
    target, _ = composed(method, seed=99)
    for part, domain in parts:
        load_part(target, part, tmp_path / (domain or part), domain=domain)
    assert torch.equal(target(ids(tokenizer)).logits, source(ids(tokenizer)).logits)


def test_single_expert_loads_into_its_slot_of_a_stacked_model(tmp_path):
    single, _ = composed(domains=["code"], seed=3)
    save_part(single, "domain", tmp_path / "code", domain="code")
    stacked, _ = composed(domains=["math", "code"], seed=4)
    before_math = stacked.model.layers[0].self_attn.q_proj.domain.A[0].clone()
    load_part(stacked, "domain", tmp_path / "code", domain="code")
    assert torch.equal(stacked.model.layers[0].self_attn.q_proj.domain.A[1],
                       single.model.layers[0].self_attn.q_proj.domain.A[0])
    assert torch.equal(stacked.model.layers[0].self_attn.q_proj.domain.A[0], before_math)


def test_config_records_the_maths(tmp_path):
    model, _ = composed("modula_flan")
    save_part(model, "router", tmp_path / "router")
    config = json.loads((tmp_path / "router" / "config.json").read_text())
    assert config["routed"] == ["universal", "math", "code"]
    assert config["dtype"] == "float32" and len(config["sha256"]) == 64


def test_truncated_file_is_a_typed_error(tmp_path):
    model, _ = composed()
    folder = save_part(model, "universal", tmp_path / "u")
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"adapter\.safetensors.*truncated"):
        load_part(composed()[0], "universal", folder)


def test_corrupt_header_with_matching_hash_is_a_typed_error(tmp_path):
    model, _ = composed()
    folder = save_part(model, "universal", tmp_path / "u")
    (folder / TENSORS_FILE).write_bytes(b"\xff" * 64)
    config = json.loads((folder / "config.json").read_text())
    from modula_ray.fileio import sha256_file
    config["sha256"] = sha256_file(folder / TENSORS_FILE)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="cannot read safetensors"):
        load_part(composed()[0], "universal", folder)


def test_shape_key_dtype_and_hyperparameter_mismatches(tmp_path):
    model, _ = composed()
    save_part(model, "domain", tmp_path / "math", domain="math")
    save_part(model, "universal", tmp_path / "u")
    # rank differs -> shape mismatch names the tensor
    other, _ = tiny_model()
    inject(other, "modula_res", ["math"], domain_rank=4, domain_alpha=8)
    with pytest.raises(ArtifactError, match="rank"):
        load_part(other, "domain", tmp_path / "math", domain="math")
    # fewer target modules -> keys mismatch
    other, _ = tiny_model()
    inject(other, "modula_res", ["math"], target_modules=["q_proj", "v_proj"])
    with pytest.raises(ArtifactError, match="target_modules"):
        load_part(other, "universal", tmp_path / "u")
    # a flan expert is not a res expert even where shapes agree
    other, _ = tiny_model()
    inject(other, "modula_flan", ["math"])
    with pytest.raises(ArtifactError, match="method"):
        load_part(other, "domain", tmp_path / "math", domain="math")
    # wrong slot
    with pytest.raises(ArtifactError, match="domain"):
        load_part(composed(domains=["code"])[0], "domain", tmp_path / "math", domain="code")
    # a tensor stored in another dtype than config.json says
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "u" / TENSORS_FILE))
    first = next(iter(tensors))
    tensors[first] = tensors[first].half()
    save_file(tensors, str(tmp_path / "u" / TENSORS_FILE))
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    from modula_ray.fileio import sha256_file
    config["sha256"] = sha256_file(tmp_path / "u" / TENSORS_FILE)
    (tmp_path / "u" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="dtype"):
        load_part(composed()[0], "universal", tmp_path / "u")


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(ArtifactError, match="config.json: file not found"):
        load_part(composed()[0], "universal", tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_part(composed()[0], "universal", tmp_path / "bad")


def test_failed_save_keeps_the_previous_version(tmp_path, monkeypatch):
    model, _ = composed(seed=1)
    folder = save_part(model, "universal", tmp_path / "u")
    before = (folder / TENSORS_FILE).read_bytes()
    import safetensors.torch

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_part(composed(seed=2)[0], "universal", folder)
    assert (folder / TENSORS_FILE).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["u"]  # no temporary leftovers


@pytest.mark.parametrize("method", ["modula_res", "lora"])
def test_universal_exports_to_peft_with_equal_logits(method, tmp_path):
    from peft import PeftModel

    model, tokenizer = composed(method, domains=["math"])
    set_stage(model, "universal")
    ours = model(ids(tokenizer)).logits
    export_peft(model, tmp_path / "peft")
    base, _ = tiny_model()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    theirs = peft_model(input_ids=ids(tokenizer)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    plain = tiny_model()[0](ids(tokenizer)).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter really changes the logits


def test_flan_domain_exports_and_res_domain_refuses(tmp_path):
    from peft import PeftModel

    model, tokenizer = composed("modula_flan", domains=["math"])
    set_stage(model, "experts")
    export_peft(model, tmp_path / "math", part="domain", domain="math")
    peft_model = PeftModel.from_pretrained(tiny_model()[0], str(tmp_path / "math")).eval()
    torch.testing.assert_close(peft_model(input_ids=ids(tokenizer)).logits, model(ids(tokenizer)).logits,
                               atol=1e-5, rtol=0)
    res, _ = composed("modula_res", domains=["math"])
    with pytest.raises(ValueError, match="not a LoRA pair"):
        export_peft(res, tmp_path / "res", part="domain", domain="math")
