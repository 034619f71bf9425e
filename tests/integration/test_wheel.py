"""The wheel works outside the checkout. It is built from a copy of the source tree, installed
into a fresh venv under tmp_path whose dependencies come from the project's .venv (a plain path in
a .pth file: the .venv's own .pth files, the editable modula-ray's finder among them, stay off),
and run from a folder outside the checkout: ``modula-ray eval --help``, the task list, the judge
rubric and the default search space all come from the installed package. No Ray, no network."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "README.md", "modula_ray", "eval", "jobs")  # jobs/configs: the search spaces
ENV = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MODULA_RAY_TASKS")} | {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PIP_NO_INDEX": "1"}
# Run inside the fresh venv: where things were found, and what they hold.
PROBE = """
import json
from lm_eval.tasks import TaskManager
import modula_ray
from modula_ray.config import load_config
from modula_ray.evaluation.judges.rubric import load_rubric
from modula_ray.evaluation.run import tasks_dir
from modula_ray.tune.search import DEFAULT_SPACE
from modula_ray.tune.space import SearchSpec
print(json.dumps({"package": modula_ray.__file__, "space": str(DEFAULT_SPACE), "tasks": str(tasks_dir()),
                  "fingerprint": load_config(SearchSpec, DEFAULT_SPACE).fingerprint(),
                  "rubric": load_rubric("ecommerce_generation").version,
                  "lm_eval_tasks": TaskManager(include_path=str(tasks_dir()), include_defaults=False).all_tasks}))
"""


def run(*command, cwd: Path) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """``(venv, outside)``: the wheel installed into a fresh venv, and a folder outside the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in BUILD_INPUTS:  # a copy, so the build writes nothing into the checkout; links stay links
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", source,
        cwd=tmp)
    [wheel] = (tmp / "dist").glob("modula_ray-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    site = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    cwd=tmp).strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # pip comes from the project's .venv too; --ignore-installed: it leaves that venv's modula-ray alone
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel, cwd=tmp)
    return venv, tmp


def test_the_installed_wheel_holds_the_tasks_rubrics_and_search_space(installed):
    from modula_ray.config import load_config
    from modula_ray.evaluation.run import suite_tasks
    from modula_ray.tune.space import SearchSpec

    venv, outside = installed
    found = json.loads(run(venv / "bin" / "python", "-c", PROBE, cwd=outside).strip().splitlines()[-1])
    for key in ("package", "space", "tasks"):
        assert Path(found[key]).resolve().is_relative_to(venv.resolve()), f"{key}: {found[key]} is not the wheel's"
    assert found["fingerprint"] == load_config(SearchSpec, ROOT / "jobs/configs/tune-router.yaml").fingerprint()
    assert found["rubric"] == "1.1"
    every_task = {name for names in suite_tasks(ROOT / "eval" / "tasks").values() for name in names}
    assert every_task | {"modula_all"} <= set(found["lm_eval_tasks"])


def test_the_installed_command_line_helps_and_lists_the_tasks(installed):
    from modula_ray.evaluation.run import suite_tasks

    venv, outside = installed
    assert "--list-tasks" in run(venv / "bin" / "modula-ray", "eval", "--help", cwd=outside)
    listed = run(venv / "bin" / "modula-ray", "eval", "--list-tasks", cwd=outside).splitlines()
    folder = Path(listed[0].removeprefix("lm-eval tasks in "))
    assert folder.resolve().is_relative_to(venv.resolve()) and (folder / "_modula_all.yaml").is_file()
    suites = {line.split(":")[0].removeprefix("--suite "): tuple(line.split(": ")[1].split(", "))
              for line in listed if line.startswith("--suite ")}
    assert suites == suite_tasks(ROOT / "eval" / "tasks")
    assert "  modula_all = modula_domains, modula_humaneval, modula_general, modula_domain_loss" in listed
