"""``mode`` (MoDE, Schafhalter et al., arXiv 2410.10181): domain experts made of whole transformer
layers beside a frozen backbone, mixed by a per-token gate.

A MoDE block spans k consecutive backbone layers (default: 3 blocks of k = 2 layers, at the end of
each third of the model; ``mode_blocks`` lists the spans ``[start, end)`` instead). Each domain has
its own trainable copy of those k layers, and a gate reads the block's input x (the residual
stream):

    y = α_bb f_bb(x) + Σ_j α_j f_j(x),    α = softmax(W_g x / τ) over [backbone, domain_1..n]

computed as ``f_bb(x) + Σ_j α_j (f_j(x) − f_bb(x))``, the same value since the α sum to 1: a fresh
copy computes f_j = f_bb bit for bit, so a freshly injected model returns the base model's logits
exactly, whatever the gate (zero, so uniform, at first).

Stages: ``experts`` (one domain's copies train, alone in place of the backbone span: y = f_1(x); no
gate), ``joint`` (experts and gates on mixed data) and ``router`` (the gates only, the analogue of
MoDULA's stage 3: add-domain and Tune run it, so old experts stay byte-identical).

The block sits at its span's first position in the model's layer list; the other positions hold
``SpanPassThrough`` so the list keeps its length (models index masks by position). Expert layers
keep their keys and values in caches of their own, one per expert, tied to the model's cache
object, so attention masks, positions, rotary embeddings and the KV cache pass through them as
through the backbone. (Beam search, which reorders the model's cache, does not reorder these.)
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import require
from ..contract import METHODS, ExpertModule, ExpertsConfig
from ..placement import transformer_blocks
from ..reference import reference_gates
from ..router import Router


class SpanPassThrough(nn.Module):
    """A layer position inside a MoDE block's span: the block already ran it."""

    def __init__(self, owner: int):
        super().__init__()
        self.owner = owner

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def extra_repr(self) -> str:
        return f"computed by the MoDE block at layer {self.owner}"


def _run(layers, hidden_states, args, kwargs):
    for layer in layers:
        hidden_states = layer(hidden_states, *args, **kwargs)
        if isinstance(hidden_states, tuple):  # older layouts return (hidden, ...)
            hidden_states = hidden_states[0]
    return hidden_states


def default_spans(n_layers: int, num_blocks: int, block_layers: int) -> list[list[int]]:
    """``num_blocks`` spans of ``block_layers`` layers, each ending a ``1/num_blocks`` part of the model."""
    ends = [round((b + 1) * n_layers / num_blocks) for b in range(num_blocks)]
    return [[end - block_layers, end] for end in ends]


@dataclass
class ModeConfig(ExpertsConfig):
    """mode: MoDE blocks over spans ``[start, end)`` of the decoder layers, one gate per block
    (``top_k``, ``temperature``, ``router_bias`` set the gate; ``target_modules`` is not read: the
    experts copy whole layers)."""

    mode_blocks: list[list[int]] | None = None  # the blocks' spans; None: the default spans below
    mode_num_blocks: int = 3                    # default: this many spans of mode_block_layers layers,
    mode_block_layers: int = 2                  # each ending a 1/mode_num_blocks part of the model

    def __post_init__(self):
        super().__post_init__()
        for name in ("mode_num_blocks", "mode_block_layers"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for i, span in enumerate(self.mode_blocks or []):
            require(len(span) == 2 and 0 <= span[0] < span[1], f"mode_blocks[{i}]",
                    f"a span is [start, end) with 0 <= start < end, got {span}")

    @property
    def router_placement(self) -> str:
        """Where the gates sit: always one per MoDE block."""
        return "block"

    def spans(self, n_layers: int, layer_types: list[str] | None = None) -> list[list[int]]:
        """The blocks' spans in a model of ``n_layers`` decoder layers, whose attention types
        (``config.layer_types``, when the model has them) must not change inside a span."""
        if self.mode_blocks:
            spans, where = [list(span) for span in self.mode_blocks], "mode_blocks"
        else:
            n, k = self.mode_num_blocks, self.mode_block_layers
            require(n * k <= n_layers, "mode_num_blocks",
                    f"mode_num_blocks x mode_block_layers = {n} x {k} exceeds the model's {n_layers} layers")
            spans, where = default_spans(n_layers, n, k), "mode_num_blocks"
        taken = set()
        for start, end in spans:
            require(end <= n_layers and not taken & set(range(start, end)), where, f"span [{start}, {end}) is "
                    f"outside the model's {n_layers} layers or overlaps another span ({spans})")
            taken |= set(range(start, end))
            require(not layer_types or len(set(layer_types[start:end])) == 1, where,
                    f"span [{start}, {end}) mixes attention types {layer_types[start:end] if layer_types else None}")
        return spans


@METHODS.register
class ModeBlock(ExpertModule):
    method = "mode"
    wraps = "blocks"
    config_class = ModeConfig
    parts = ("domain", "router")
    stages = ("experts", "router", "joint")
    stage_plan = ("experts", "joint")
    add_domain_plan = ("experts", "router")
    fixed_routed = ("backbone",)
    universal = None

    def __init__(self, layers: list[nn.Module], n_domains: int, span: tuple[int, int], d_model: int,
                 config: ModeConfig | None = None, **settings):
        super().__init__()
        self.settings = s = self.configure(config, **settings)
        s.check_routed(len(self.routed_names(range(n_domains))))
        self.n_domains, self.span = n_domains, tuple(span)
        self.backbone = nn.ModuleList(layers).requires_grad_(False)
        self.experts = nn.ModuleList(nn.ModuleList(copy.deepcopy(layer) for layer in layers) for _ in range(n_domains))
        like = next(self.backbone.parameters())
        self.gate = Router(d_model, n_domains + 1, top_k=s.top_k, temperature=s.temperature, bias=s.router_bias,
                           dtype=like.dtype, device=like.device)
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.set_stage("joint")

    # the contract's part names: the expert copies are the domain part, the gate is the router
    @property
    def domain(self) -> nn.ModuleList:
        return self.experts

    @property
    def router(self) -> Router:
        return self.gate

    @classmethod
    def inject_into(cls, model: nn.Module, n_domains: int, config: ModeConfig) -> None:
        """Replace each span of the model's decoder layers by a ``ModeBlock`` (and pass-throughs)."""
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError("model: no transformer blocks (a ModuleList of layers with an input_layernorm)")
        list_path = next(iter(blocks)).rpartition(".")[0]
        layer_list = model.get_submodule(list_path)
        spans = config.spans(len(layer_list), getattr(getattr(model, "config", None), "layer_types", None))
        d_model = next(layer_list[0].input_layernorm.parameters()).shape[-1]
        for start, end in spans:
            layer_list[start] = cls(list(layer_list[start:end]), n_domains, (start, end), d_model, config)
            for i in range(start + 1, end):
                layer_list[i] = SpanPassThrough(start)

    def _expert_kwargs(self, kwargs: dict, j: int) -> dict:
        """The expert's own KV cache beside the model's (same positions, its own keys and values)."""
        cache = kwargs.get("past_key_values")
        if cache is None:
            return kwargs
        own = self._caches.get(cache)
        if own is None:
            from transformers import DynamicCache

            # a cache that rows join and leave (serving's slots) makes siblings that move with it
            sibling = getattr(cache, "sibling", DynamicCache)
            own = self._caches[cache] = [sibling() for _ in self.experts]
        return {**kwargs, "past_key_values": own[j]}

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.stage == "experts":
            return _run(self.experts[0], hidden_states, args, self._expert_kwargs(kwargs, 0))
        base = _run(self.backbone, hidden_states, args, kwargs)
        gates = self.gate(hidden_states)
        out = base
        for j, expert in enumerate(self.experts):
            out = out + gates[..., j + 1:j + 2] * (_run(expert, hidden_states, args, self._expert_kwargs(kwargs, j))
                                                   - base)
        return out

    def reference(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``α_bb f_bb(x) + Σ_j α_j f_j(x)`` path by path, from the named parameters (no cache)."""
        kwargs = {**kwargs, "past_key_values": None, "use_cache": False}
        if self.stage == "experts":
            return _run(self.experts[0], hidden_states, args, kwargs)
        p = dict(self.gate.named_parameters())
        alpha = reference_gates(hidden_states, p["weight"], p.get("bias"), self.settings.top_k,
                                self.settings.temperature)
        y = alpha[..., 0:1] * _run(self.backbone, hidden_states, args, kwargs)
        for j, expert in enumerate(self.experts):
            y = y + alpha[..., j + 1:j + 2] * _run(expert, hidden_states, args, kwargs)
        return y

    def idle_parameters(self) -> list[nn.Parameter]:
        if self.stage == "experts":  # the expert replaces the backbone span; no gate
            return list(self.backbone.parameters()) + list(self.gate.parameters())
        return []

    def part_tensors(self, part: str, index: int | None = None) -> dict[str, torch.Tensor]:
        if part == "domain":
            return {f"expert.{name}": t for name, t in self.experts[index].named_parameters()}
        if part == "router":
            return dict(self.gate.named_parameters())
        raise ValueError(f"part: method {self.method!r} has no {part!r} part")

    def part_hparams(self, part: str) -> dict:
        if part == "domain":
            return {"span": list(self.span)}
        s = self.settings
        return {"top_k": s.top_k, "temperature": s.temperature, "bias": s.router_bias, "placement": s.router_placement}

    @classmethod
    def stack(cls, blocks: list["ModeBlock"], where: str = "block") -> "ModeBlock":
        """Blocks with one or more experts each (over the same backbone span) -> one with all of them."""
        first = blocks[0]
        for other in blocks[1:]:
            mine, theirs = first.backbone.state_dict(), other.backbone.state_dict()
            if other.span != first.span or any(not torch.equal(mine[k], theirs[k]) for k in mine):
                raise ValueError(f"{where}: the blocks to stack sit over different backbone layers")
        stacked = cls(list(first.backbone), sum(b.n_domains for b in blocks), first.span, first.gate.weight.shape[1],
                      first.settings)
        experts = [expert for block in blocks for expert in block.experts]
        with torch.no_grad():
            for target, source in zip(stacked.experts, experts):
                target.load_state_dict(source.state_dict())
        return stacked

    def extra_repr(self) -> str:
        return f"method=mode, span={list(self.span)}, n_domains={self.n_domains}, stage={self.stage}"
