"""``ExpertLinear``: a frozen ``nn.Linear`` plus LoRA-shaped experts, ``y = W0 x + delta(x)``.

The LoRA methods (``lora``, ``molora``, ``modula_flan``, ``modula_res``) subclass it in
``methods/`` and keep the method contract of ``contract.py``; on top of it they carry:

``rank_code(x)``      their maths as one LoRA of rank R: ``delta(x) = up c(x)``, the code ``c [T, R]``
                      holding every active expert's gated, scaled rank activations
``domain_reads``      what a domain expert reads: ``x`` (d_in) or ``h`` (d_out, res)
``part_tensors``      which tensors a saved part holds (domain tensors have the expert axis first)

The forward is the same for all of them, ``y = (W0 x + b0).addmm_(c(x), up^T)``: the A matrices (and
the layer's router) are concatenated so one matmul reads x, gates and scales reach the few rank
columns as one multiply (``gate_ranks``), one matmul goes up, and it adds into the frozen path's
output in place. The cost is one LoRA of rank R (lora 16; molora 4 x 8; flan and res 16 + 4 x 8)
plus a router; measured against peft in docs/PERFORMANCE.md.

The stage decides which parts take part in the forward and which train (DESIGN §1):

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
import torch.nn.functional as F
from torch import nn

from .contract import METHODS, PARTS, STAGE_TRAINS, STAGES, ExpertModule, method_class  # noqa: F401 (re-exported)
from .parts import LowRankExpert, StackedExperts
from .placement import PLACEMENTS
from .router import Router


def _positive(field: str, value, kinds=(int,)) -> None:
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field} must be a positive {'integer' if kinds == (int,) else 'number'}, got {value!r}")


class ExpertLinear(ExpertModule):
    """A frozen ``nn.Linear`` plus the method's LoRA-shaped experts: ``y = W0 x + delta(x)``."""

    domain_reads: ClassVar[str] = "x"            # res: A_i reads h (d_out), not x (d_in)
    options = ("universal_rank", "domain_rank", "universal_alpha", "domain_alpha", "top_k", "temperature", "dropout",
               "router_bias", "router_placement")

    def __init__(self, base: nn.Linear, n_domains: int, *, universal_rank: int = 16, domain_rank: int = 8,
                 universal_alpha: float = 32, domain_alpha: float = 16, top_k: int | None = None,
                 temperature: float = 1.0, dropout: float = 0.0, router_bias: bool = False,
                 router_placement: str = "layer"):
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
        if router_placement not in PLACEMENTS:
            raise ValueError(f"router_placement must be one of {PLACEMENTS}, got {router_placement!r}")
        if router_placement != "layer" and "router" not in self.parts:
            raise ValueError(f"router_placement: method {self.method!r} has no router")
        n_routed = len(self.routed_names(range(n_domains)))
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
                                 temperature=temperature, dropout=dropout, router_bias=router_bias,
                                 router_placement=router_placement)
        self.universal_scale = universal_alpha / universal_rank
        self.domain_scale = domain_alpha / domain_rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_in, d_out = base.in_features, base.out_features
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.universal = LowRankExpert(d_in, d_out, universal_rank, **kw) if "universal" in self.parts else None
        d_read = d_out if self.domain_reads == "h" else d_in
        self.domain = StackedExperts(n_domains, d_read, d_out, domain_rank, **kw) if "domain" in self.parts else None
        self.router = (Router(d_in, n_routed, top_k=top_k, temperature=temperature, bias=router_bias, **kw)
                       if "router" in self.parts and router_placement == "layer" else None)
        self.__dict__["shared_router"] = None  # placement 'block': the block's router (placement.py)
        if "router" in self.parts:  # see gate_ranks(); a buffer, so torch.compile sees a fixed tensor
            scales = ([(universal_rank, self.universal_scale)] if "universal" in self.fixed_routed else []) + \
                [(domain_rank, self.domain_scale)] * n_domains
            self.register_buffer("gate_expansion", torch.block_diag(*[torch.full((1, r), s) for r, s in scales]).to(
                **kw), persistent=False)
        self._fused: dict = {}                  # see fused()
        self.set_stage("joint")

    # -- the contract: subclasses ----------------------------------------------------
    def rank_code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """For ``x [..., d_in]``: the code ``c [..., R]`` and ``up [d_out, R]``, ``delta(x) = c @ up.T``."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``y`` computed expert by expert from the named parameters (see ``reference.py``)."""
        raise NotImplementedError

    def part_tensors(self, part: str, index: int | None = None) -> dict[str, torch.Tensor]:
        """The live tensors of ``part`` by parameter name; ``index`` picks one domain expert."""
        module = getattr(self, part, None) if part in PARTS else None
        if module is None:
            raise ValueError(f"part: method {self.method!r} has no {part!r} part")
        tensors = dict(module.named_parameters())
        return {name: t[index] for name, t in tensors.items()} if part == "domain" else tensors

    def part_hparams(self, part: str) -> dict:
        """Hyperparameters a saved ``part`` must share with the model it loads into."""
        kw = self.layer_kwargs
        if part == "universal":
            return {"rank": kw["universal_rank"], "alpha": kw["universal_alpha"]}
        if part == "domain":
            return {"rank": kw["domain_rank"], "alpha": kw["domain_alpha"], "reads": self.domain_reads}
        return {"top_k": kw["top_k"], "temperature": kw["temperature"], "bias": kw["router_bias"],
                "placement": kw["router_placement"]}

    @classmethod
    def stack(cls, layers: list["ExpertLinear"], where: str = "layer") -> "ExpertLinear":
        """n layers with one or more domain experts each -> one layer holding all of them, in order.

        Every domain tensor is concatenated on its leading expert axis; the base and the universal
        expert must be identical across layers (stage 2 never changes them); the router is new.
        """
        first = layers[0]
        if first.domain is None:
            raise ValueError(f"{where}: method {first.method!r} has no domain experts to stack")
        for other in layers[1:]:
            if type(other) is not type(first):
                raise ValueError(f"{where}: cannot stack {other.method!r} with {first.method!r}")
            if other.base.weight.shape != first.base.weight.shape or not torch.equal(other.base.weight,
                                                                                      first.base.weight):
                raise ValueError(f"{where}: the frozen base weights differ between the layers to stack")
            if first.universal is not None:
                mine, theirs = first.part_tensors("universal"), other.part_tensors("universal")
                if any(not torch.equal(mine[k], theirs[k]) for k in mine):
                    raise ValueError(f"{where}: the universal experts differ; stack experts trained over one "
                                     f"universal")
            shapes = {k: tuple(t.shape[1:]) for k, t in other.domain.named_parameters()}
            if shapes != {k: tuple(t.shape[1:]) for k, t in first.domain.named_parameters()}:
                raise ValueError(f"{where}: domain expert shapes differ ({shapes})")
        stacked = cls(first.base, sum(layer.n_domains for layer in layers), **first.layer_kwargs)
        with torch.no_grad():
            if first.universal is not None:
                universal = first.part_tensors("universal")
                for name, tensor in stacked.part_tensors("universal").items():
                    tensor.copy_(universal[name])
            for name, tensor in stacked.domain.named_parameters():
                tensor.copy_(torch.cat([dict(layer.domain.named_parameters())[name] for layer in layers]))
        return stacked

    # -- shared -----------------------------------------------------------------------
    @property
    def mixing(self) -> bool:
        """True when the router (the layer's own, or its block's) mixes the experts."""
        return self.stage in ("router", "joint") and (self.router is not None or self.shared_router is not None)

    @property
    def dropping(self) -> bool:
        """True when dropout is on (training, p > 0): the A matrices read a dropped-out copy of x."""
        return isinstance(self.dropout, nn.Dropout) and self.training

    def routed_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gates over the routed experts ``[..., n_routed]``: the layer's router (or its block's) in the
        mixture, 1 in stage experts."""
        if not self.mixing:
            return x.new_ones(*x.shape[:-1], 1)
        if self.router is not None:
            return self.router(x)
        return self.shared_router.current(x, self.method)

    def read(self, x: torch.Tensor, *mats: torch.Tensor, joined: bool = False
             ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``[x M^T for M in mats]`` (``joined``: as one piece, the columns side by side) and the gates
        (``None`` outside the mixture) from one matmul that reads x once: the A matrices and the
        layer's router weight concatenated. With dropout on, the A matrices read dropout(x) and the
        router, which reads x, has a matmul of its own."""
        fuse_router = self.mixing and self.router is not None and not self.dropping
        if fuse_router:
            mats = (*mats, self.router.weight)
        down = self.fused(("down", len(mats)), lambda: torch.cat(mats)) if len(mats) > 1 else mats[0]
        out = self.dropout(x) @ down.T
        widths = [m.shape[0] for m in mats]
        if joined:
            widths = [sum(widths[:-1]), widths[-1]] if fuse_router else [sum(widths)]
        pieces = list(out.split(widths, dim=-1))
        if fuse_router:
            return pieces, self.router.gate(pieces.pop())
        return pieces, self.routed_gates(x) if self.mixing else None

    def fused(self, name, build):
        """``build()``, weights joined (or multiplied) for the fused path. Without autograd (serving,
        evaluation) it is kept until a parameter of the layer changes, so a decode step joins nothing."""
        if torch.is_grad_enabled():
            return build()
        key = (self.stage, self.mixing, *((p.data_ptr(), p._version) for p in self.parameters()))
        hit = self._fused.get(name)
        if hit is None or hit[0] != key:
            hit = self._fused[name] = (key, build())
        return hit[1]

    def universal_code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage universal: ``s* A* x`` going up through ``B*``."""
        (u,), _ = self.read(x, self.universal.A)
        return u * self.universal_scale, self.universal.B

    def gate_ranks(self, z: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """``s_j g_j z_j`` over the rank columns ``z [..., R]`` of the routed experts (expert j's ranks
        adjacent, in router order), or ``s_d z`` for one domain expert alone (``gates`` None). The gates
        reach the rank columns through one tiny matmul ``gates @ E``, where ``E [n_routed, R]``
        (``gate_expansion``) holds each expert's scale on its columns: one multiply on ``z``."""
        if gates is None:
            return z * self.domain_scale
        return z * (gates @ self.gate_expansion.to(gates.dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``y - (W0 x + b0)``: what the experts add (DESIGN §3), from the rank code."""
        code, up = self.rank_code(x)
        return code @ up.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code, up = self.rank_code(x)
        y = F.linear(x.reshape(-1, x.shape[-1]), self.base.weight, self.base.bias)
        y = y.addmm_(code.reshape(-1, code.shape[-1]), up.T)  # in place: torch.addmm would copy W0 x first
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return (f"method={self.method}, n_domains={self.n_domains}, stage={self.stage}, "
                f"in={self.base.in_features}, out={self.base.out_features}")


def wrap_linear(base: nn.Linear, method: str, n_domains: int, **layer_kwargs) -> ExpertLinear:
    """Wrap one frozen linear layer with the experts of ``method`` (see DESIGN §1)."""
    return method_class(method)(base, n_domains, **layer_kwargs)
