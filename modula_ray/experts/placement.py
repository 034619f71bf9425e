"""Router placement: one router per adapted linear layer (``layer``, the default), or one router
shared by every adapted layer of a transformer block (``block``).

A block router reads the block's attention input, the output of the block's ``input_layernorm``
(what q, k and v read), and computes ``g = softmax(W_R norm(x) / tau)`` once per block forward;
every adapted layer of the block (q, k, v, o, gate, up, down) mixes its experts with those gates.
So a block has ``n_routed x d_model`` router parameters instead of seven routers, and for q, k
and v the gates are exactly what a per-layer router with the same weights would compute.

The router lives on the block (``model.layers.<i>.router.weight``). Two hooks drive it: a
pre-hook on the block forgets the previous forward's gates, and a hook on ``input_layernorm``
computes the new ones, so an adapted layer can never use gates from another forward.
"""
from __future__ import annotations

import torch
from torch import nn

from .router import Router

PLACEMENTS = ("layer", "block")
NORM = "input_layernorm"


class BlockRouter(Router):
    """A ``Router`` whose gates are computed from the block's normed input and read by its layers."""

    def __init__(self, d_model: int, n_routed: int, **kwargs):
        super().__init__(d_model, n_routed, **kwargs)
        self.active = False                       # set by set_stage: the mixture is on
        self.gates: torch.Tensor | None = None    # of the current block forward
        self.last_input: torch.Tensor | None = None

    def forget(self, module, args) -> None:       # forward pre-hook on the block
        self.gates = self.last_input = None

    def capture(self, module, args, output) -> None:  # forward hook on input_layernorm
        if self.active:
            self.last_input = output
            self.gates = self(output)

    def current(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """The gates for input ``x`` of the adapted layer at ``where`` (same tokens as the block's)."""
        if self.gates is None or self.gates.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"{where}: the block router has no gates for this forward; a block-placed "
                               f"router needs the block's {NORM} to run before its adapted layers")
        return self.gates


def _block_of(path: str, blocks: dict[str, nn.Module]) -> str | None:
    return next((b for b in blocks if path.startswith(b + ".")), None)


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: block}``: every element of an ``nn.ModuleList`` that holds an ``input_layernorm``."""
    return {f"{path}.{i}" if path else str(i): block for path, module in model.named_modules()
            if isinstance(module, nn.ModuleList) for i, block in enumerate(module)
            if isinstance(getattr(block, NORM, None), nn.Module)}


def attach_block_routers(model: nn.Module, layers: dict, n_routed: int, config) -> dict[str, BlockRouter]:
    """Give every block that holds adapted ``layers`` (``{path: ExpertLinear}``) one ``BlockRouter``
    with the router settings of ``config`` (``top_k``, ``temperature``, ``router_bias``)."""
    blocks = transformer_blocks(model)
    owners = {path: _block_of(path, blocks) for path in layers}
    homeless = [p for p, b in owners.items() if b is None]
    if homeless:
        raise ValueError(f"router_placement: 'block' needs every adapted layer inside a transformer block with "
                         f"an {NORM}; {homeless[0]} is not")
    routers = {}
    for block_path in sorted(set(owners.values()), key=list(blocks).index):
        block = blocks[block_path]
        if "router" in block._modules and not isinstance(block.router, BlockRouter):
            raise ValueError(f"router_placement: {block_path} already has a module called 'router'")
        norm = getattr(block, NORM)
        weight = next(norm.parameters(), None)
        d_model = weight.shape[-1] if weight is not None else norm.normalized_shape[-1]
        like = next(iter(layers.values())).base.weight
        router = BlockRouter(d_model, n_routed, top_k=config.top_k, temperature=config.temperature,
                             bias=config.router_bias, dtype=like.dtype, device=like.device)
        detach_block_router(block)
        block.router = router
        block.register_forward_pre_hook(router.forget)
        norm.register_forward_hook(router.capture)
        routers[f"{block_path}.router"] = router
    for path, layer in layers.items():
        layer.__dict__["shared_router"] = blocks[owners[path]].router  # a reference, not a submodule
    return routers


def detach_block_router(block: nn.Module) -> None:
    """Remove a block's router and its hooks (before ``stack_experts`` gives it a larger one)."""
    old = block._modules.pop("router", None)
    if not isinstance(old, BlockRouter):
        if old is not None:
            block._modules["router"] = old
        return
    for hooks in (block._forward_pre_hooks, getattr(block, NORM)._forward_hooks):
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is old]:
            del hooks[key]


def block_routers(model: nn.Module) -> dict[str, BlockRouter]:
    return {path: m for path, m in model.named_modules() if isinstance(m, BlockRouter)}
