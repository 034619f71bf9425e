"""The scoring functions the eval/tasks YAMLs call, on known-good and known-bad answers, and the
lm-eval plugin hook that lets a plain ``lm_eval`` command line find ``--model modula``."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from modula_ray.errors import ConfigError
from modula_ray.evaluation import tasks

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, answer", [("435", "435"), ("  435\nbecause ...", "435"),
                                          ("The answer is 435.", "435"), ("<answer>435</answer>", "435"),
                                          ("Answer: terse", "terse"), ("", "")])
def test_the_answer_is_the_first_line_without_its_preamble(text, answer):
    assert tasks.extract_answer(text) == answer


def test_reasoning_gym_rows_are_scored_by_their_own_generators_scorer():
    doc = {"prompt": "What is 400 + 35?", "answer": "435",
           "meta": json.dumps({"generator": "basic_arithmetic", "metadata": {}})}
    assert tasks.score_reasoning_gym(doc, ["435"]) == {"score": 1.0, "exact_match": 1.0}
    assert tasks.score_reasoning_gym(doc, ["436"])["score"] == 0.0
    bf = {"prompt": "...", "answer": "terse", "meta": json.dumps({"generator": "bf", "metadata": {}})}
    assert tasks.score_reasoning_gym(bf, ["terse\n\nmore"])["score"] == 1.0


def test_categories_are_scored_on_aisle_and_department():
    doc = {"meta": json.dumps({"aisle": "fresh dips tapenades", "department": "deli", "task": "categorise"})}
    assert tasks.score_category(doc, ["Fresh dips tapenades / Deli"]) == {
        "aisle_acc": 1.0, "department_acc": 1.0, "exact_match": 1.0}
    assert tasks.score_category(doc, ["fresh dips tapenades / produce"])["exact_match"] == 0.0
    assert tasks.score_category(doc, ["deli"]) == {"aisle_acc": 0.0, "department_acc": 0.0, "exact_match": 0.0}


def test_multiple_choice_options_are_what_training_answered():
    doc = {"choices": ["Amygdala", "Hippocampus", "Mammillary body", "Prefrontal cortex"], "answer": "Hippocampus"}
    assert tasks.mc_choices(doc)[1] == "B. Hippocampus" and tasks.mc_target(doc) == 1


def test_domain_loss_is_per_utf8_byte_of_the_response():
    assert tasks.nll_per_byte({"response": "héllo"}, [(-12.0, False)]) == {"nll_per_byte": 2.0}


def test_general_capability_uses_only_subjects_outside_every_domain():
    from modula_ray.data.sources.finance import FinanceSource
    from modula_ray.data.sources.medicine import MedicineSource

    rows = tasks.load_general()["test"]
    assert len(rows) == len(tasks.GENERAL_SUBJECTS) * tasks.GENERAL_PER_SUBJECT
    assert not set(rows["subject"]) & (set(FinanceSource.subjects) | set(MedicineSource.subjects))
    assert all(r["answer"] in r["choices"] for r in rows)


def test_a_missing_data_folder_is_a_clear_error_and_no_environment_variable_stands_in(monkeypatch, tmp_path):
    monkeypatch.setenv("MODULA_RAY_DATA", str(tmp_path))  # the old process-wide default: ignored now
    with pytest.raises(ConfigError, match="data_dir: no data folder"):
        tasks.load_domain_split("math")
    assert tasks.resolve_data_dir(data_dir=tmp_path / "given", run="ignored when data_dir is given") == str(
        tmp_path / "given")


def test_the_suites_are_read_from_the_task_yamls():
    """One source of truth: ``metadata.suite`` in the YAMLs; the suites cover ``modula_all`` exactly."""
    from modula_ray.evaluation.run import HEADLINE, read_task_yamls, suite_tasks

    suites = suite_tasks()
    assert {name: set(names) for name, names in suites.items()} == {
        "domain": {"modula_math", "modula_code", "modula_humaneval", "modula_medicine", "modula_finance",
                   "modula_ecommerce", "modula_domain_loss"},
        "general": {"modula_general"}}
    configs = read_task_yamls()

    def leaves(name):  # modula_all down to what lm-eval reports: tasks, and groups with an aggregate
        config = configs[name]
        if "group" in config and not config.get("aggregate_metric_list"):
            return [leaf for member in config["task"] for leaf in leaves(member)]
        return [name]

    every = [name for names in suites.values() for name in names]
    assert sorted(every) == sorted(leaves("modula_all")), "a task in two suites, or one of modula_all in none"
    assert set(HEADLINE) <= set(suites["domain"])


def test_the_task_folder_can_be_overridden_and_a_wrong_one_is_named(monkeypatch, tmp_path):
    from modula_ray.evaluation.run import suite_tasks, tasks_dir

    monkeypatch.setenv("MODULA_RAY_TASKS", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("task: mine\nmetadata: {version: 1.0, suite: custom}\n")
    assert tasks_dir() == tmp_path and suite_tasks() == {"custom": ("mine",)}
    monkeypatch.setenv("MODULA_RAY_TASKS", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="absent is not a folder of lm-eval task YAMLs"):
        tasks_dir()


def test_every_task_yaml_names_its_command_and_a_version():
    import yaml

    from modula_ray.evaluation.run import TaskYamlLoader

    files = sorted((ROOT / "eval" / "tasks").rglob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        text = path.read_text()
        assert text.startswith("# lm_eval --model modula"), path
        config = yaml.load(text, Loader=TaskYamlLoader)
        assert config["metadata"]["version"] >= 1, path
        assert "/" not in json.dumps(config.get("dataset_kwargs", {})), f"{path}: no paths in task YAMLs"


def test_the_plugin_hook_registers_modula_in_a_fresh_interpreter(tmp_path):
    """What ``make install`` writes: a .pth line that lets ``get_model("modula")`` resolve."""
    from modula_ray.evaluation.lm_eval_hook import PTH_LINE

    code = (PTH_LINE.strip() + "\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('modula').__module__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["modula_ray.evaluation.lm", "HFLM"]
