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


def method_name_checks(source: str, names: list[str]) -> list[int]:
    """Lines of ``source`` that test a value against method names written out: ``x == "lora"``,
    ``"modula" in label``, ``x in ("lora", ...)``, ``x.startswith("modula")``, ``for m in
    ("modula_res", ...)`` and ``case "mode":``. A fragment is any literal of 4+ characters inside a
    method name ("modula", "lora")."""
    def named(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    def fragment(node) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= 4
                and any(node.value in name for name in names))

    def listed(node, test) -> bool:
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(test(e) for e in node.elts)

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for op, left, right in zip(node.ops, [node.left, *node.comparators], node.comparators):
                if isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)) and (named(left) or named(right)):
                    lines.append(node.lineno)
                if isinstance(op, (ast.In, ast.NotIn)) and (fragment(left) or listed(right, named)):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith"):
            if any(fragment(arg) or listed(arg, fragment) for arg in node.args):
                lines.append(node.lineno)
        elif isinstance(node, (ast.For, ast.comprehension)) and listed(node.iter, named):
            lines.append(node.iter.lineno)
        elif isinstance(node, ast.MatchValue) and named(node.value):
            lines.append(node.lineno)
    return sorted(set(lines))


def general_domain_literals(source: str, general: str) -> list[int]:
    """Lines that spell the general domain's name (``data.general_domain``) instead of reading the
    config; a statement about the "general" lm-eval suite, which shares the name, is not one."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == general:
            statement = node
            while not isinstance(statement, ast.stmt):
                statement = parents[statement]
            start = sum(len(line) + 1 for line in source.splitlines()[:statement.lineno - 1]) + statement.col_offset
            end = sum(len(line) + 1 for line in source.splitlines()[:node.end_lineno - 1]) + node.end_col_offset
            if "suite" not in source[start:end].lower():
                lines.append(node.lineno)
    return lines


def test_method_names_are_spelled_only_in_the_method_files():
    """Everything outside ``experts/methods/`` asks the registry instead of comparing method names
    (an HTTP ``request.method`` is not one), and reads the general domain from the config
    (``data.general_domain``) outside ``data/`` and ``config.py``."""
    from modula_ray.config import DataConfig
    from modula_ray.experts import METHODS

    offenders = []
    for path in (ROOT / "modula_ray").rglob("*.py"):
        inside = path.relative_to(ROOT / "modula_ray").parts
        if "methods" in inside:
            continue
        source, where = path.read_text(), path.relative_to(ROOT)
        text = source.splitlines()
        for number, line in enumerate(text, 1):
            if re.search(r"(?<!request\.)method\s*[!=]=|[!=]=\s*['\"](lora|molora|modula_flan|modula_res|mode)['\"]", line):
                offenders.append(f"{where}:{number}: {line.strip()}")
        numbers = method_name_checks(source, METHODS.names())
        if inside[0] != "data" and inside != ("config.py",):
            numbers += general_domain_literals(source, DataConfig().general_domain)
        offenders += [f"{where}:{number}: {text[number - 1].strip()}" for number in sorted(set(numbers))]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("source, lines", [
    # experiment/figures.py:22
    ('colour = "tab:red" if "modula" in label else "tab:blue" if "mode" in label else "tab:gray"', [1]),
    ('for method in ("modula_res", "modula_flan"):\n    pass', [1]),  # experiment/report.py:332
    ('ok = method in ["lora", "molora"]', [1]), ('ok = not name.startswith(("molora", "x"))', [1]),
    ('ok = "lora" == spec', [1]), ('match method:\n    case "mode":\n        pass', [2]),
    ('ok = [m for m in {"lora", "mode"}]', [1]),
])
def test_the_lint_catches_method_names_written_any_way(source, lines):
    from modula_ray.experts import METHODS

    assert method_name_checks(source, METHODS.names()) == lines


def test_the_lint_catches_the_general_domain_spelled_out_but_not_the_general_suite():
    routing_py_93 = 'domains = [d for d in list(manifest["domains"]) + ["general"] if d in built]'
    assert general_domain_literals(routing_py_93, "general") == [1]
    assert general_domain_literals('if x:\n    pick("general")\nelse:\n    y = 1', "general") == [2]
    assert general_domain_literals('SUITE_TASKS = {\n    "domain": (),\n    "general": ("modula_general",)}',
                                   "general") == []
    assert general_domain_literals('general = suites.get("general", {})  # the general suite', "general") == []
    assert method_name_checks('ok = request.method == "POST" or "code" in domains', ["lora", "mode"]) == []


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
