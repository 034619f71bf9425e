"""Method registry: adding a method is one file with ``@register_method`` plus its import below."""
from __future__ import annotations

from torch import nn

METHODS: dict[str, type] = {}


def register_method(cls):
    METHODS[cls.method] = cls
    return cls


def method_class(method: str) -> type:
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def wrap_linear(base: nn.Linear, method: str, n_domains: int, *, universal_rank: int = 16, domain_rank: int = 8,
                universal_alpha: float = 32, domain_alpha: float = 16, top_k: int | None = None,
                temperature: float = 1.0, dropout: float = 0.0, router_bias: bool = False) -> nn.Module:
    """Wrap one frozen linear layer with the experts of ``method`` (see DESIGN §1)."""
    return method_class(method)(base, n_domains, universal_rank=universal_rank, domain_rank=domain_rank,
                                universal_alpha=universal_alpha, domain_alpha=domain_alpha, top_k=top_k,
                                temperature=temperature, dropout=dropout, router_bias=router_bias)


def _load_builtin_methods() -> None:
    from . import lora, modula_flan, modula_res, molora  # noqa: F401  (registers each method)


_load_builtin_methods()
