"""Data files that ship inside the package, found with ``importlib.resources``.

- ``eval/``: the lm-eval task YAMLs (``eval/tasks``) and the judge rubrics (``eval/judges``);
- ``tune-router.yaml``, ``tune-router-paper.yaml``: the default Ray Tune search spaces.

In a checkout these entries are symbolic links to the repository's ``eval/`` and
``jobs/configs/``, which stay the files' one home; the wheel holds copies (``package-data`` in
pyproject.toml), and ``ray job submit --working-dir .`` uploads the files the links point to. So
the editable install, a job's upload and an installed wheel all read the same names here.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def asset(*parts: str) -> Path:
    """The real path of a packaged file or folder, e.g. ``asset("eval", "tasks")``."""
    return Path(str(files(__name__).joinpath("/".join(parts)))).resolve()
