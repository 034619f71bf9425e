"""``ExpertLinear``: a frozen ``nn.Linear`` plus LoRA-shaped experts, ``y = W0 x + delta(x)``.

The LoRA methods (``lora``, ``molora``, ``modula_flan``, ``modula_res``) subclass it in
``methods/`` and keep the method contract of ``contract.py``; on top of it they carry:

``rank_code(x)``      their maths as one LoRA of rank R: ``delta(x) = up c(x)``, the code ``c [T, R]``
                      holding every active expert's gated, scaled rank activations
``domain_reads``      what a domain expert reads: ``x`` (d_in) or ``h`` (d_out, res)
``config_class``      ``LinearExpertsConfig`` (ranks, alphas, dropout, router; lora: ``LoraConfig``)
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

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import require
from .contract import METHODS, PARTS, ExpertModule, ExpertsConfig, method_class  # noqa: F401 (METHODS: re-exported)
from .parts import LowRankExpert, StackedExperts
from .placement import PLACEMENTS, attach_block_routers
from .router import Router


def _positive_int(config, name: str) -> None:
    value = getattr(config, name)
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
            f"must be a positive integer, got {value!r}")


@dataclass
class LinearExpertsConfig(ExpertsConfig):
    """The LoRA-shaped experts of ``molora``, ``modula_flan`` and ``modula_res`` (``lora``: its own
    subclass); scaling is ``s = alpha / r`` (DESIGN §1)."""

    universal_rank: int = 16                 # r_u
    domain_rank: int = 8                     # r_d
    universal_alpha: float = 32.0            # s* = universal_alpha / r_u
    domain_alpha: float = 16.0               # s  = domain_alpha / r_d
    dropout: float = 0.0                     # on each A's input
    router_placement: str = "layer"          # layer: a router per adapted linear | block: one per transformer block

    def __post_init__(self):
        super().__post_init__()
        for name in ("universal_rank", "domain_rank"):
            _positive_int(self, name)
        for name in ("universal_alpha", "domain_alpha"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.router_placement in PLACEMENTS, "router_placement",
                f"must be one of {list(PLACEMENTS)}, got {self.router_placement!r}")

    def target_paths(self, model: nn.Module) -> dict[str, list[str]]:
        """``{target name: [module paths]}``: every ``nn.Linear`` of ``model`` named by ``target_modules``."""
        found = {name: [] for name in self.target_modules}
        for path, module in model.named_modules():
            leaf = path.rsplit(".", 1)[-1]
            if leaf in found and isinstance(module, nn.Linear):
                found[leaf].append(path)
        missing = [name for name, paths in found.items() if not paths]
        require(not missing, "target_modules", f"no nn.Linear named {missing} in {type(model).__name__}")
        return found


class ExpertLinear(ExpertModule):
    """A frozen ``nn.Linear`` plus the method's LoRA-shaped experts: ``y = W0 x + delta(x)``."""

    domain_reads: ClassVar[str] = "x"            # res: A_i reads h (d_out), not x (d_in)
    config_class = LinearExpertsConfig

    def __init__(self, base: nn.Linear, n_domains: int, config: LinearExpertsConfig | None = None, **settings):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(n_domains, int) or isinstance(n_domains, bool) or n_domains < 1:
            raise ValueError(f"n_domains must be a positive integer, got {n_domains!r}")
        self.settings = s = self.configure(config, **settings)
        n_routed = len(self.routed_names(range(n_domains)))
        s.check_routed(n_routed)

        self.base = base.requires_grad_(False)
        self.n_domains = n_domains
        self.universal_scale = s.universal_alpha / s.universal_rank
        self.domain_scale = s.domain_alpha / s.domain_rank
        self.dropout = nn.Dropout(s.dropout) if s.dropout > 0 else nn.Identity()
        d_in, d_out = base.in_features, base.out_features
        for name in ("universal_rank", "domain_rank"):  # before anything is allocated (a manifest's rank is bounded)
            require(getattr(s, name) <= 2 * min(d_in, d_out), name, f"must be at most {2 * min(d_in, d_out)}, twice "
                    f"the smaller side of the {d_out}x{d_in} weight it adapts, got {getattr(s, name)}")
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.universal = LowRankExpert(d_in, d_out, s.universal_rank, **kw) if "universal" in self.parts else None
        d_read = d_out if self.domain_reads == "h" else d_in
        self.domain = StackedExperts(n_domains, d_read, d_out, s.domain_rank, **kw) if "domain" in self.parts else None
        self.router = (Router(d_in, n_routed, top_k=s.top_k, temperature=s.temperature, bias=s.router_bias, **kw)
                       if "router" in self.parts and s.router_placement == "layer" else None)
        self.__dict__["shared_router"] = None  # placement 'block': the block's router (placement.py)
        if "router" in self.parts:  # see gate_ranks(); a buffer, so torch.compile sees a fixed tensor
            scales = ([(s.universal_rank, self.universal_scale)] if "universal" in self.fixed_routed else []) + \
                [(s.domain_rank, self.domain_scale)] * n_domains
            self.register_buffer("gate_expansion", torch.block_diag(*[torch.full((1, r), v) for r, v in scales]).to(
                **kw), persistent=False)
        self._fused: dict = {}                  # see fused()
        self.set_stage("joint")

    @classmethod
    def inject_into(cls, model: nn.Module, n_domains: int, config: LinearExpertsConfig) -> None:
        """Replace every target ``nn.Linear`` of ``model`` by this method's layer; with
        ``router_placement: block``, give each transformer block one router for its layers."""
        layers = {}
        for paths in config.target_paths(model).values():
            for path in paths:
                parent_path, _, attr = path.rpartition(".")
                parent = model.get_submodule(parent_path)
                layers[path] = cls(getattr(parent, attr), n_domains, config)
                setattr(parent, attr, layers[path])
        if config.router_placement == "block":
            attach_block_routers(model, layers, len(cls.routed_names(range(n_domains))), config)

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
        s = self.settings
        if part == "universal":
            return {"rank": s.universal_rank, "alpha": s.universal_alpha}
        if part == "domain":
            return {"rank": s.domain_rank, "alpha": s.domain_alpha, "reads": self.domain_reads}
        return {"top_k": s.top_k, "temperature": s.temperature, "bias": s.router_bias, "placement": s.router_placement}

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
        stacked = cls(first.base, sum(layer.n_domains for layer in layers), first.settings)
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
        evaluation) it is kept until a parameter of the layer changes, so a decode step joins nothing.
        A change is seen through autograd's version counter: code that writes weights without
        bumping it (fused AdamW, DeepSpeed, ``.data``) must call ``increment_version`` (the
        training engines do, ``train/engine.py``)."""
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

    def serving(self, fold: bool = False):
        """This layer's ``serving.ServingLinear`` at its inference stage (``fold``: the universal expert
        merged into a new W0 where the maths allows), or None to keep the trained form."""
        return None

    def serving_mixes(self) -> bool:
        """The mixture runs with the layer's own router (not stage 2 alone, not a router per block)."""
        return self.mixing and self.router is not None

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


def wrap_linear(base: nn.Linear, method: str, n_domains: int, config: ExpertsConfig | None = None,
                **settings) -> ExpertLinear:
    """Wrap one frozen linear layer with the experts of ``method`` (see DESIGN §1): ``config`` (its
    ``config_class``) or its settings as keyword arguments."""
    return method_class(method)(base, n_domains, config, **settings)
