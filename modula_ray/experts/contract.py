"""The method contract: what the pipeline, saving, loading, serving and reports ask of a method.

Each method is one file in ``methods/`` whose class subclasses ``ExpertModule`` (through
``ExpertLinear`` for the LoRA methods), registers itself in ``METHODS`` and carries:

``wraps``             what ``inject`` replaces: every target ``linear``, or spans of transformer ``blocks``
``config_class``      its settings: a dataclass subclassing ``ExpertsConfig`` (its keys, defaults, docs and
                      checks), read from the ``experts:`` block of a pipeline config and given to ``inject``
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

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from ..errors import ConfigError, require
from ..registry import Registry

STAGES = ("universal", "experts", "router", "joint")
PARTS = ("universal", "domain", "router")
STAGE_TRAINS = {"universal": ("universal",), "experts": ("domain",), "router": ("router",), "joint": PARTS}
METHODS = Registry("method", "method")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ExpertsConfig:
    """The settings every method shares: the adapted linears and the router (DESIGN §1; the paper
    leaves them open). A method's ``config_class`` subclasses it with its own keys."""

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    top_k: int | None = None                 # None = dense softmax, as in the paper
    temperature: float = 1.0                 # tau in softmax(W_R x / tau)
    router_bias: bool = False

    def __post_init__(self):
        require(bool(self.target_modules), "target_modules", "must name at least one module")
        require(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or null, got {self.top_k}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")

    def check_routed(self, n_routed: int) -> None:
        """``top_k`` keeps at most every routed expert."""
        require(self.top_k is None or self.top_k <= n_routed, "top_k",
                f"top_k={self.top_k} must be in 1..{n_routed} (the {n_routed} routed experts)")


def config_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


class ExpertModule(nn.Module):
    method: ClassVar[str]
    wraps: ClassVar[str] = "linear"
    config_class: ClassVar[type[ExpertsConfig]] = ExpertsConfig
    parts: ClassVar[tuple[str, ...]]
    stages: ClassVar[tuple[str, ...]]
    stage_plan: ClassVar[tuple[str, ...]]
    add_domain_plan: ClassVar[tuple[str, ...]]
    inference_stage: ClassVar[str] = "router"
    fixed_routed: ClassVar[tuple[str, ...]] = ()
    peft_parts: ClassVar[tuple[str, ...]] = ()

    shared_router = None  # placement 'block': the router of the module's transformer block (placement.py)

    @classmethod
    def routed_names(cls, domains) -> list:
        return list(cls.fixed_routed) + list(domains)

    @classmethod
    def route_labels(cls, domains, data_domains) -> dict[str, int]:
        """Supervised routing targets by row domain: a domain's own expert; a data domain without
        one (the general domain) goes to the first fixed routed expert (flan: universal, mode:
        backbone), or gets no label when there is none."""
        routed = cls.routed_names(domains)
        fallback = {d: 0 for d in data_domains if d not in routed} if cls.fixed_routed else {}
        return fallback | {d: routed.index(d) for d in data_domains if d in routed}

    @classmethod
    def configure(cls, config: ExpertsConfig | None = None, **settings) -> ExpertsConfig:
        """The method's settings: ``config`` (an instance of its ``config_class``), or one built from
        keyword arguments; a key the method does not have raises ConfigError naming it."""
        if config is not None:
            if settings or not isinstance(config, cls.config_class):
                raise ConfigError("experts", f"method {cls.method!r} takes one {cls.config_class.__name__} or keyword "
                                             f"settings, got {type(config).__name__} and {sorted(settings)}")
            return config
        keys = config_keys(cls.config_class)
        for key in settings:
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(key, f"method {cls.method!r} has no such setting; {hint}it has {keys}")
        return cls.config_class(**settings)

    @property
    def mixing(self) -> bool:
        """True when a router mixes the experts (stages router and joint): the module's own, or its block's."""
        return self.stage in ("router", "joint") and (self.router is not None or self.shared_router is not None)

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
