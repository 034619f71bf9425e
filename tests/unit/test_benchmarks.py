"""The layer benchmark runs end to end on a tiny shape and reports what PERFORMANCE.md reads.

It only checks that the script works (schema, ratios computed against the rows it names, the
inference path, bad input refused); its speed figures come from real shapes, recorded in
docs/results/, never from a test.
"""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_layers_tiny_shape_reports_every_configuration(tmp_path, capsys):
    bench = _load("bench_layers")
    out = tmp_path / "layers.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--runs", "tiny:32:2", "--repeats", "3", "--warmup", "1", "--inference", "--serving",
                    "--malloc", "default", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    train = {r["method"]: r for r in result["rows"] if r["phase"] == "train"}
    assert set(train) == set(bench.METHODS)
    for method, row in train.items():
        assert row["shape"] == "tiny" and row["seq"] == 32 and row["batch"] == 2
        assert len(row["samples_ms"]) == 3 and row["step_ms"] in row["samples_ms"]
        for other in ("peft_lora", "base"):  # the median of the ratios within each interleaved round
            paired = statistics.median(a / b for a, b in zip(row["samples_ms"], train[other]["samples_ms"]))
            assert row[f"ratio_vs_{other}"] == pytest.approx(paired, abs=2e-3)
        assert row["tokens_per_s"] == pytest.approx(64 / (row["step_ms"] / 1e3), rel=1e-3)
        assert 0 < row["mfu"] < 1
    assert train["base"]["trainable_params"] == 0
    # peft r16 and our lora put the same rank-16 pairs on the same seven projections
    assert train["peft_lora"]["trainable_params"] == train["lora"]["trainable_params"] > 0
    assert train["modula_res"]["trainable_params"] > train["molora"]["trainable_params"]
    for phase in ("prefill", "decode"):
        rows = {r["method"]: r for r in result["rows"] if r["phase"] == phase}
        served = {f"{m}/{form}" for m in bench.SERVABLE for form in ("served", "folded")}  # experts/serving.py
        assert set(rows) == set(bench.METHODS) | served
        assert rows["peft_lora"]["ratio_vs_peft_lora"] == 1.0 and rows["base"]["ratio_vs_base"] == 1.0
        for row in rows.values():  # interleaved rounds too, so the same pairing
            assert len(row["samples_ms"]) == 3 and row["step_ms"] in row["samples_ms"]
            paired = statistics.median(a / b for a, b in zip(row["samples_ms"], rows["base"]["samples_ms"]))
            assert row["ratio_vs_base"] == pytest.approx(paired, abs=2e-3)
    assert result["machine"]["device"] == "cpu" and result["machine"]["malloc"] == "default"
    assert result["machine"]["adamw"] == "fused"


def test_bench_layers_refuses_bad_arguments(capsys):
    bench = _load("bench_layers")
    for argv, message in ((["--methods", "lora,qlora"], "unknown ['qlora']"),
                          (["--runs", "gpt9:256:4"], "unknown shape ['gpt9']"),
                          (["--runs", "smollm2-135m:256"], "expected shape:seq:batch")):
        with pytest.raises(SystemExit) as exit_:
            bench.main([*argv, "--malloc", "default"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_layer_techniques_variants_equal_the_reference(tmp_path, capsys):
    """Every variant of the ablation is checked against the per-expert loop before it is timed."""
    techniques = _load("layer_techniques")
    out = tmp_path / "techniques.json"
    techniques.main(["--tokens", "16", "--repeats", "1", "--malloc", "default", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    expected = {"base", "peft_lora"} | {f"{m}/{v.__name__}" for m, chain in techniques.CHAINS.items() for v in chain}
    assert set(rows) == expected
    assert rows["peft_lora"]["ratio_vs_peft_lora"] == 1.0
    assert all(rows[f"{m}/shipped"]["technique"].startswith("= ``ExpertLinear.forward``") for m in techniques.CHAINS)


def test_bench_layers_times_an_earlier_commit_in_the_same_process(tmp_path):
    """``--against REV`` imports the layers of REV beside today's: same shapes, same parameters."""
    bench = _load("bench_layers")
    out = tmp_path / "against.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--runs", "tiny:16:1", "--methods", "base,peft_lora,modula_res", "--against", "HEAD",
                    "--repeats", "1", "--warmup", "0", "--malloc", "default", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"base", "peft_lora", "modula_res", "modula_res@HEAD"}
    for key in ("trainable_params", "forward_params"):
        assert rows["modula_res@HEAD"][key] == rows["modula_res"][key] > 0


def test_bench_truncation_counts_what_each_cut_keeps():
    """The right cut drops a row whose long prompt fills max_length; today's cut keeps its response."""
    from modula_ray.models import load_base

    _, tokenizer = load_base("tiny-llama")
    rows = [{"prompt": "word " * 100 + "What is 2 + 2?", "response": "4"}, {"prompt": "hi", "response": "ok"}]
    result = _load("bench_truncation").measure(rows, tokenizer, 48)
    assert result["right_cut"] == {"rows": 2, "kept": 1, "dropped": 1, "scored_tokens": result["right_cut"][
        "scored_tokens"], "tokens": result["right_cut"]["tokens"]}
    assert (result["prompt_start_first"]["kept"], result["prompt_start_first"]["dropped"]) == (2, 0)
    assert result["scored_ratio"] == round(result["prompt_start_first"]["scored_tokens"]
                                           / result["right_cut"]["scored_tokens"], 3) > 1
