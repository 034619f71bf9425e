"""Inject experts into a Hugging Face causal LM and drive its stage.

``inject`` replaces every target ``nn.Linear`` (Llama and Qwen2 layouts: q/k/v/o and
gate/up/down projections) by the method's ``ExpertLinear``, or, for a method that wraps blocks
(``mode``), spans of transformer blocks by its block module; it freezes the rest of the model.
The model carries an ``ExpertSpec`` in ``model.modula_spec``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .contract import STAGE_TRAINS, STAGES, ExpertModule, ExpertsConfig, method_class
from .placement import block_routers


@dataclass
class ExpertSpec:
    """What was injected: enough to rebuild the same expert layers on the same base."""

    method: str
    domains: list[str]
    config: ExpertsConfig                    # the method's settings (its config_class)

    @property
    def method_class(self) -> type[ExpertModule]:
        return method_class(self.method)

    @property
    def target_modules(self) -> list[str]:
        return list(self.config.target_modules)

    def routed_names(self) -> list[str]:
        """Router output order, as the method defines it (flan puts the universal expert first)."""
        return self.method_class.routed_names(self.domains)


def _check_domains(domains) -> list[str]:
    domains = list(domains)
    if not domains:
        raise ValueError("domains: n_domains must be >= 1, got an empty list")
    for name in domains:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"domains: bad domain name {name!r} (letters, digits, '-' and '_' only)")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains: duplicate names in {domains}")
    return domains


def inject(model: nn.Module, method: str, domains, config: ExpertsConfig | None = None, **settings) -> nn.Module:
    """Put the method's experts into ``model`` in place: wrap every target linear (LoRA methods) or
    spans of transformer blocks (``mode``); returns the model, base frozen, stage ``joint``.

    ``config`` is the method's settings (its ``config_class``), or pass them as keyword arguments;
    a setting that does not fit the model raises ``ConfigError`` naming it."""
    cls = method_class(method)
    domains = _check_domains(domains)
    config = cls.configure(config, **settings)
    config.check_routed(len(cls.routed_names(domains)))
    if getattr(model, "modula_spec", None) is not None:
        raise ValueError("model: experts are already injected into this model")
    model.requires_grad_(False)
    cls.inject_into(model, len(domains), config)
    model.modula_spec = ExpertSpec(method, domains, config)
    return set_stage(model, "joint")


def expert_layers(model: nn.Module) -> dict[str, ExpertModule]:
    """``{module path: expert module}`` (wrapped linears, or MoDE blocks), in model order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, ExpertModule)}


def spec_of(model: nn.Module) -> ExpertSpec:
    spec = getattr(model, "modula_spec", None)
    if spec is None:
        raise ValueError("model: no experts injected (call inject first)")
    return spec


def set_stage(model: nn.Module, stage: str) -> nn.Module:
    """Set every expert layer's stage: which parts run in the forward and which train."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    spec = spec_of(model)
    if stage == "experts" and len(spec.domains) != 1:
        raise ValueError(f"set_stage('experts') needs a model with exactly one domain expert; "
                         f"this one holds {len(spec.domains)}: {spec.domains}")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in expert_layers(model).values():
        layer.set_stage(stage)
    for router in block_routers(model).values():
        router.active = stage in ("router", "joint")
        router.requires_grad_("router" in STAGE_TRAINS[stage])
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def forward_parameter_count(model: nn.Module) -> int:
    """Parameters that take part in the forward at the current stage: every parameter (a tied
    embedding counted once, as the output head) minus the expert parts the stage leaves out,
    minus an untied input embedding (a lookup, not a matmul)."""
    total = sum(p.numel() for p in model.parameters())
    for layer in expert_layers(model).values():
        total -= sum(p.numel() for p in layer.idle_parameters())
    total -= sum(p.numel() for r in block_routers(model).values() if not r.active for p in r.parameters())
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and (head is None or head.weight is not embeddings.weight):
        total -= embeddings.weight.numel()
    return total


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The routers that mix experts at the current stage: ``{module path: Router}``, per layer
    (``...q_proj.router``) or per block (``...layers.3.router``)."""
    per_layer = {f"{path}.router": layer.router for path, layer in expert_layers(model).items()
                 if layer.router is not None and layer.mixing}
    return per_layer | {path: r for path, r in block_routers(model).items() if r.active}


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """Mean Switch load-balancing loss over the routers used in the last forward (0 if none)."""
    losses = [r.aux_loss for r in routers(model).values() if r.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def gate_entropy(model: nn.Module) -> float | None:
    """Mean ``Router.entropy`` over the routers of the last forward (None without one)."""
    values = [r.entropy for r in routers(model).values() if r.entropy is not None]
    return float(torch.stack(values).mean()) if values else None


def supervised_routing_loss(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the routers of the last forward of ``Router.routing_loss(labels)`` (0 if none)."""
    losses = [loss for r in routers(model).values() if (loss := r.routing_loss(labels)) is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def routing_weights(model: nn.Module) -> dict[str, float]:
    """Mean gate per routed expert over all routers and tokens of the last forward."""
    gates = [r.mean_gates for r in routers(model).values() if r.mean_gates is not None]
    if not gates:
        return {}
    mean = torch.stack(gates).mean(dim=0)
    return dict(zip(spec_of(model).routed_names(), mean.tolist()))


def last_position_gates(model: nn.Module) -> torch.Tensor | None:
    """Gates of each row's last position averaged over all routers of the last forward,
    ``[batch, n_routed]`` in ``routed_names`` order; ``None`` without an active router."""
    gates = [r.last_gates for r in routers(model).values() if r.last_gates is not None]
    return torch.stack(gates).mean(dim=0) if gates else None


@contextlib.contextmanager
def forced_expert(model: nn.Module, index: int):
    """Every router returns the one-hot gate of routed expert ``index`` while inside: the mixture's
    forward with all its weight on that expert (the specialisation matrix; stage 2 trained together)."""
    active = list(routers(model).values())

    def one_hot(router, scores):
        gates = torch.zeros_like(scores)
        gates[..., index] = 1.0
        router._record(gates, gates, None, scores)
        return gates

    for router in active:
        router.gate = one_hot.__get__(router)
    try:
        yield
    finally:
        for router in active:
            del router.gate
