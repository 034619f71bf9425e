"""Fault-injection hooks that only tests set: ``{"call": "module:function", **kwargs}`` becomes
``function(subject, **kwargs)``, called where the product runs (a Train stage after each optimizer
step: ``StageTask.after_step``; a Serve replica's rows as they join the running batch:
``ServeArgs.decode_hook``), so a
test can kill a worker or fail a decode in the real process instead of mocking it."""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable


def imported(reference: str):
    """The object that ``"module:name"`` names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def hook(spec: dict | None) -> Callable | None:
    """``spec`` as a one-argument callable, or None when no hook is set."""
    if not spec:
        return None
    kwargs = dict(spec)
    return functools.partial(imported(kwargs.pop("call")), **kwargs)
