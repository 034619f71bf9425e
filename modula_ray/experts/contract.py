"""The method contract: what the pipeline, saving, loading, serving and reports ask of a method.

Each method is one file in ``methods/`` whose class subclasses ``ExpertModule`` (through
``ExpertLinear`` for the LoRA methods), registers itself in ``METHODS`` and carries:

``wraps``             what ``inject`` replaces: every target ``linear``, or spans of transformer ``blocks``
``options``           the ``ExpertsConfig`` fields (injection keyword arguments) it reads
``parts``             which of universal / domain / router it has (``router``: whatever mixes the experts)
``stages``            the stages it can be set to; ``stage_plan`` the pipeline's; ``add_domain_plan``
                      the stages re-run to plug in one more domain; ``inference_stage`` a finished one's
``routed_names``      the router's output order: ``fixed_routed`` (flan: universal; mode: backbone), then the domains
``reference``         its maths as a plain per-expert loop (tests hold the fast path to it)
``part_tensors``      the tensors a saved part holds, by name (without the domain's index)
``part_hparams``      what a saved part must share with the model it loads into
``peft_parts``        parts that are plain LoRA pairs and export to PEFT
``stack``             several single-domain modules -> one with all their experts

``set_stage`` sets which parts train (``STAGE_TRAINS``); which take part in the forward is the
method's maths (``mixing``: the router mixes the experts, in stages router and joint).
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..registry import Registry

STAGES = ("universal", "experts", "router", "joint")
PARTS = ("universal", "domain", "router")
STAGE_TRAINS = {"universal": ("universal",), "experts": ("domain",), "router": ("router",), "joint": PARTS}
METHODS = Registry("method", "method")


class ExpertModule(nn.Module):
    method: ClassVar[str]
    wraps: ClassVar[str] = "linear"
    options: ClassVar[tuple[str, ...]] = ()
    parts: ClassVar[tuple[str, ...]]
    stages: ClassVar[tuple[str, ...]]
    stage_plan: ClassVar[tuple[str, ...]]
    add_domain_plan: ClassVar[tuple[str, ...]]
    inference_stage: ClassVar[str] = "router"
    fixed_routed: ClassVar[tuple[str, ...]] = ()
    peft_parts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def routed_names(cls, domains) -> list:
        return list(cls.fixed_routed) + list(domains)

    @property
    def mixing(self) -> bool:
        """True when the router mixes the experts (stages router and joint)."""
        return self.stage in ("router", "joint") and self.router is not None

    def set_stage(self, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage not in self.stages:
            raise ValueError(f"stage {stage!r} does not apply to method {self.method!r} (it has {self.stages})")
        if stage == "experts" and self.n_domains != 1:
            raise ValueError(f"stage 'experts' needs exactly one domain expert; this layer holds {self.n_domains}")
        self.stage = stage
        for part in PARTS:
            module = getattr(self, part, None)
            if module is not None:
                module.requires_grad_(part in STAGE_TRAINS[stage])

    def active_parts(self) -> tuple[str, ...]:
        """Parts that take part in the forward at the current stage."""
        if self.stage == "universal":
            return ("universal",)
        return tuple(p for p in self.parts if p != "router" or self.mixing)

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters the forward does not use at the current stage (left out of FLOP counts)."""
        idle = [getattr(self, part, None) for part in set(self.parts) - set(self.active_parts())]
        return [p for module in idle if module is not None for p in module.parameters()]

    def reference(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def part_tensors(self, part: str, index: int | None = None) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def part_hparams(self, part: str) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def method_class(method: str, field: str = "method") -> type[ExpertModule]:
    """The registered class of ``method``; unknown names raise ``ConfigError`` with a suggestion."""
    return METHODS.get(method, field=field)
