"""Lets a plain ``lm_eval`` command line find ``--model modula`` (lm-eval 0.4 discovers no plugins).

modula-ray declares its model the standard way, as an entry point of group ``lm_eval.models``
(pyproject.toml). lm-eval 0.4.13 does not read that group yet, so a one-line ``.pth`` file in
site-packages (written by ``make install``: ``python -m modula_ray.evaluation.lm_eval_hook``) calls
``install()`` at interpreter start-up. That only adds an import hook: nothing is imported until
``lm_eval.models`` is, and then each entry point of the group is registered as a lazy placeholder,
so ``lm_eval.api.registry.get_model("modula")`` imports ``modula_ray.evaluation.lm`` on demand.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
import sysconfig
from pathlib import Path

GROUP, TRIGGER = "lm_eval.models", "lm_eval.models"
PTH_NAME = "modula_ray_lm_eval.pth"
PTH_LINE = ("import importlib.util as _u; _u.find_spec('modula_ray') and "
            "__import__('modula_ray.evaluation.lm_eval_hook', fromlist=['install']).install()\n")


def register_entry_points(registry) -> list[str]:
    """Register every ``lm_eval.models`` entry point not yet known; returns the names added."""
    added = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name not in registry:
            registry.register(entry.name, target=entry.value)
            added.append(entry.name)
    return added


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        from lm_eval.api.registry import model_registry

        register_entry_points(model_registry)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TRIGGER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Add the import hook (once); if lm-eval's models are already imported, register now."""
    if TRIGGER in sys.modules:
        from lm_eval.api.registry import model_registry

        register_entry_points(model_registry)
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def write_pth(site_packages: str | None = None) -> Path:
    """Write the ``.pth`` file into this interpreter's site-packages (what ``make install`` runs)."""
    path = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


if __name__ == "__main__":
    print(f"wrote {write_pth()}")
