"""The data files the package ships (``modula_ray.assets``): the checkout's own ``eval/`` and
default search spaces, found through ``importlib.resources``, never by climbing ``parents[n]``.
The installed wheel is checked by tests/integration/test_wheel.py."""
from pathlib import Path

from modula_ray.assets import asset

ROOT = Path(__file__).resolve().parents[2]


def test_the_packaged_files_are_the_checkouts_eval_folder_and_search_spaces():
    from modula_ray.evaluation.judges.rubric import JUDGES_DIR, load_rubric
    from modula_ray.evaluation.run import tasks_dir

    assert tasks_dir().samefile(ROOT / "eval" / "tasks") and JUDGES_DIR.samefile(ROOT / "eval" / "judges")
    assert load_rubric("ecommerce_generation").criteria[0] == "helpfulness"
    for name in ("tune-router.yaml", "tune-router-paper.yaml"):
        assert asset(name).samefile(ROOT / "jobs" / "configs" / name)


def test_an_experiment_names_a_shipped_search_space_from_anywhere(tmp_path):
    """``tune.space: tune-router-paper.yaml`` beside an experiment file outside jobs/configs is
    the packaged space; a file of that name beside the experiment file wins."""
    from modula_ray.experiment.config import resolve

    experiment = tmp_path / "experiment.yaml"
    assert resolve(experiment, "tune-router-paper.yaml") == asset("tune-router-paper.yaml")
    assert resolve(experiment, "demo.yaml") == tmp_path / "demo.yaml"  # not shipped: the error names this path
    (tmp_path / "tune-router-paper.yaml").write_text("space: {}\n")
    assert resolve(experiment, "tune-router-paper.yaml") == tmp_path / "tune-router-paper.yaml"
