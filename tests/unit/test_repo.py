"""Repository hygiene and the method contract: what ships with `ray job submit --working-dir .`."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Everything the project means to have at its root; anything else is a stray (see commit d4ffa1b).
ROOT_ENTRIES = {".ci", ".gitignore", ".rayignore", "Makefile", "README.md", "benchmarks", "cluster",
                "constraints.txt", "docs", "eval", "jobs", "modula_ray", "pyproject.toml",
                "requirements-nodeps.txt", "tests"}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return out.stdout.splitlines()


def test_no_stray_files_at_the_repo_root():
    roots = {path.split("/", 1)[0] for path in tracked_files()}
    assert roots <= ROOT_ENTRIES, f"unexpected tracked files at the root: {sorted(roots - ROOT_ENTRIES)}"
    assert {"modula_ray", "jobs", "eval", "cluster", "tests", "pyproject.toml", "README.md"} <= roots


def test_method_names_are_spelled_only_in_the_method_files():
    """Everything outside ``experts/methods/`` asks the registry instead of comparing method names
    (an HTTP ``request.method`` is not one)."""
    offenders = []
    for path in (ROOT / "modula_ray").rglob("*.py"):
        if "methods" in path.relative_to(ROOT / "modula_ray").parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(?<!request\.)method\s*[!=]=|[!=]=\s*['\"](lora|molora|modula_flan|modula_res|mode)['\"]", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


LAYERS = {"experts": {"train", "tune", "serve", "evaluation", "compose", "cli", "experiment"},
          "data": {"train", "tune", "serve", "evaluation", "compose", "cli", "experiment"},
          "compose": {"train", "tune", "serve", "evaluation", "cli", "experiment"},
          "train": {"evaluation", "tune", "serve", "cli", "experiment"},
          "evaluation": {"train", "tune", "serve", "cli", "experiment"},
          "serve": {"train", "tune", "evaluation", "cli", "experiment"},
          "tune": {"serve", "cli", "experiment"},
          "experiment": {"cli"}}


def imported_packages(path: Path) -> set[str]:
    """``modula_ray`` sub-packages a module imports (absolute or relative), and ``ray``."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = list(package[:len(package) - node.level + 1]) + (node.module or "").split(".")
            else:
                parts = (node.module or "").split(".")
            names = [parts + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        for name in names:
            name = [n for n in name if n]
            if name[:1] == ["ray"]:
                found.add("ray")
            elif name[:1] == ["modula_ray"] and len(name) > 1:
                found.add(name[1])
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_flow_downward(package):
    """DESIGN §3: experts/data/compose never import a layer above them; train never imports
    evaluation; Ray only in train/, tune/, serve/ and the CLI (data/ray_data.py: inside a function;
    experiment/, which drives train, tune and evaluation beside the CLI: only its runner)."""
    folder = ROOT / "modula_ray" / package
    files = list(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
    for path in files:
        imports = imported_packages(path)
        assert not imports & LAYERS[package], f"{path.relative_to(ROOT)} imports {imports & LAYERS[package]}"
        if package in ("experts", "compose", "evaluation") or (package == "data" and path.name != "ray_data.py") or (
                package == "experiment" and path.name != "runner.py"):
            assert "ray" not in imports, f"{path.relative_to(ROOT)} imports ray"


def test_a_data_build_leaves_the_working_directory_clean(tmp_path, monkeypatch):
    """reasoning-gym's codeio runs programs that write files (how stray CSVs once reached main)."""
    from modula_ray.data.build import build_datasets

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    build_datasets("tiny", 0, tmp_path / "data", ["code"], progress=False)
    assert list(cwd.iterdir()) == [] and Path.cwd() == cwd
