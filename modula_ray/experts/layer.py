"""``ExpertLinear``: a frozen ``nn.Linear`` plus low-rank experts, ``y = W0 x + delta(x)``.

Each method (one file each) subclasses it and writes ``delta``. The stage decides
which parts take part in the forward and which train (DESIGN §1):

=========  ==========================  =====================================
stage      trainable                   forward
=========  ==========================  =====================================
universal  universal expert            ``W0 x + s* B* A* x``
experts    the single domain expert    flan/molora ``W0 x + s B_1 A_1 x``;
                                       res ``W0 x + h + s B_1 LeakyReLU(A_1 h)``
router     router                      the full mixture
joint      every adapter part          the full mixture
=========  ==========================  =====================================
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .parts import LowRankExpert, StackedExperts
from .router import Router

STAGES = ("universal", "experts", "router", "joint")
PARTS = ("universal", "domain", "router")
STAGE_TRAINS = {"universal": ("universal",), "experts": ("domain",), "router": ("router",), "joint": PARTS}


def _positive(field: str, value, kinds=(int,)) -> None:
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field} must be a positive {'integer' if kinds == (int,) else 'number'}, got {value!r}")


class ExpertLinear(nn.Module):
    method: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]          # which of universal / domain / router exist
    stages: ClassVar[tuple[str, ...]]         # stages this method can be set to
    domain_reads_h: ClassVar[bool] = False    # res: A_i reads h (d_out), not x (d_in)

    def __init__(self, base: nn.Linear, n_domains: int, *, universal_rank: int = 16, domain_rank: int = 8,
                 universal_alpha: float = 32, domain_alpha: float = 16, top_k: int | None = None,
                 temperature: float = 1.0, dropout: float = 0.0, router_bias: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        _positive("n_domains", n_domains)
        _positive("universal_rank", universal_rank)
        _positive("domain_rank", domain_rank)
        _positive("universal_alpha", universal_alpha, (int, float))
        _positive("domain_alpha", domain_alpha, (int, float))
        _positive("temperature", temperature, (int, float))
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        n_routed = self.n_routed_for(n_domains)
        if top_k is not None:
            if "router" not in self.parts:
                raise ValueError(f"top_k: method {self.method!r} has no router")
            _positive("top_k", top_k)
            if top_k > n_routed:
                raise ValueError(f"top_k={top_k} exceeds the {n_routed} routed experts of {self.method!r}")

        self.base = base.requires_grad_(False)
        self.n_domains = n_domains
        self.layer_kwargs = dict(universal_rank=universal_rank, domain_rank=domain_rank,
                                 universal_alpha=universal_alpha, domain_alpha=domain_alpha, top_k=top_k,
                                 temperature=temperature, dropout=dropout, router_bias=router_bias)
        self.universal_scale = universal_alpha / universal_rank
        self.domain_scale = domain_alpha / domain_rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_in, d_out = base.in_features, base.out_features
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.universal = LowRankExpert(d_in, d_out, universal_rank, **kw) if "universal" in self.parts else None
        d_read = d_out if self.domain_reads_h else d_in
        self.domain = StackedExperts(n_domains, d_read, d_out, domain_rank, **kw) if "domain" in self.parts else None
        self.router = (Router(d_in, n_routed, top_k=top_k, temperature=temperature, bias=router_bias, **kw)
                       if "router" in self.parts else None)
        self.set_stage("joint")

    # -- subclasses -------------------------------------------------------------------
    @classmethod
    def n_routed_for(cls, n_domains: int) -> int:
        return n_domains

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------
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
            module = getattr(self, part)
            if module is not None:
                module.requires_grad_(part in STAGE_TRAINS[stage])

    def routed_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gates over the domain experts ``[..., n]``: the router's in the mixture, 1 in stage experts."""
        if not self.mixing:
            return x.new_ones(*x.shape[:-1], 1)
        return self.router(x)

    def mix_domains(self, z: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``sum_i g_i s_d B_i z_i`` for rank activations ``z [..., n, r]``, in one matmul."""
        return self.domain.up(z * (self.domain_scale * gates).unsqueeze(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)

    def extra_repr(self) -> str:
        return (f"method={self.method}, n_domains={self.n_domains}, stage={self.stage}, "
                f"in={self.base.in_features}, out={self.base.out_features}")
