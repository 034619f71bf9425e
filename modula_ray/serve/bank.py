"""One forward for the rows of every composition over one base: the base's weights plus a bank of adapters.

The compositions a replica serves over the same base model share its frozen weights
(``models.load_base(share=True)``). A ``Bank`` is one more model over those weights whose adapted
projections are ``BankLinear``: for a step whose rows belong to compositions ``c_1 .. c_k`` (and
to the base model alone), each projection computes::

    y = W0 x + b;   y[rows of c] += code_c(x[rows of c]) U_c     for each composition c present

``W0 x`` is one matmul over every row. A prefill (or a step of one composition's rows) then takes
the rows grouped by composition (one gather of x, one scatter back), and each composition's adapter
(``ServingLinear.code``: its own routers and gates) runs on its own rows alone, so it costs the
adapters' FLOPs of its rows and no more. A decode step of several compositions' rows (or with the
base's rows between) runs every member's adapter in one pass instead (``union.py``): a few ops per
projection however many compositions it mixes, for the FLOPs of every member's ranks on every row.
A row of the base model alone gets nothing added. The router still mixes every token of every
row: this is S-LoRA's batching of adapters over one base, for token-level mixtures.

A composition joins when every projection it adapts is a ``ServingLinear`` over the shared W0
(not folded) and nothing else in its model differs from the base (so not ``mode``); others run in
a forward of their own. Members are added when their first row joins and dropped when their last
row leaves, so a hot-plugged composition's old version stays until its rows finish.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.serving import ServingLinear
from .union import Union, unites


def bank_key(model) -> int | None:
    """The base weights ``model`` shares (its embedding's identity), or None if it cannot join a bank:
    expert modules still in trained form (``mode``'s blocks, layers routed per block) or a folded W0."""
    spec = getattr(model, "modula_spec", None)
    if spec is not None:
        from ..experts import expert_layers

        if expert_layers(model) or any(getattr(m, "folded", False) for m in model.modules()):
            return None
    return id(model.get_input_embeddings().weight)


class BankLinear(nn.Module):
    """``W0 x + b`` plus, per row, its own composition's adapter (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bank: "Bank", path: str):
        super().__init__()
        self.weight, self.bias, self.bank, self.path = weight, bias, [bank], path
        self._union: tuple = (None, None)

    def _united(self, members: tuple) -> Union | None:
        """The members' ``Union`` at this projection (None if one of them cannot join one)."""
        if self._union[0] != members:
            layers = [self.bank[0].adapters[m].get(self.path) for m in members]
            self._union = (members, Union(layers) if all(map(unites, layers)) and any(layers) else None)
        return self._union[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = F.linear(flat, self.weight, self.bias)
        bank = self.bank[0]
        if bank.segments:
            union = self._united(bank.present) if x.shape[-2] == 1 and bank.mixed else None
            if union is not None:   # decode of several members' rows (or with the base's between): one pass
                logits, gates = union.add_to(y, flat, *bank.masks(union))
                if bank.rows_of is not None:
                    union.record(logits, gates, bank.rows_of)
                return y.view(*x.shape[:-1], y.shape[-1])
            layers = [bank.adapters[member].get(self.path) for member in bank.members]
            if any(layers):   # each member on its own rows (prefill, one member, or a top-k router)
                grouped = flat if bank.order is None else flat.index_select(0, bank.order)
                delta = y if bank.order is None else y.new_zeros(grouped.shape[0], y.shape[1])
                for layer, (rows, start, end) in zip(layers, bank.segments):
                    if layer is not None:               # its rows: its read and up cost its FLOPs only
                        mine = grouped[start:end] @ layer.read
                        delta[start:end].addmm_(layer.code(mine, (rows, (end - start) // rows)), layer.up)
                if bank.order is not None:
                    y.index_add_(0, bank.order, delta)
        return y.view(*x.shape[:-1], y.shape[-1])


class Bank:
    """A model over the shared base whose adapted projections serve every member at once."""

    def __init__(self, model):
        """``model``: any model over the base (a member's, or the base alone): the skeleton is a copy
        sharing its weights, with every projection a member may adapt made a ``BankLinear``."""
        skeleton = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
        self.model, self.adapters = skeleton, {}
        self.members: tuple = ()          # with rows in the next forward, in the grouped order
        self.segments: list = []          # per member: (rows, first token, end token) in the grouped order
        self.order: torch.Tensor | None = None
        self.local: dict[int, int] = {}   # row -> its index among its member's rows (routing records)
        self.mixed = False                # a decode step runs a ``Union``: rows of several members, or not grouped
        self.present: tuple = ()          # ``members`` in the order they joined: a ``Union`` lasts while they run
        self.member_of_row: list[int] = []  # per row: its member's index in ``present`` (-1: the base alone)
        self.rows_of: list | None = None  # per ``present`` member: its rows, in local order (routing records)
        self._masks: dict = {}            # per ``Union.signature``: its masks for this step
        self.unite = True                 # False: every decode step runs each member on its own rows (A/B)
        self.layers: dict[str, BankLinear] = {}
        for path, module in list(skeleton.named_modules()):
            if isinstance(module, (ServingLinear, nn.Linear)) and path and path != "lm_head" and \
                    "embed" not in path:
                parent, _, name = path.rpartition(".")
                self.layers[path] = BankLinear(module.weight, module.bias, self, path)
                setattr(skeleton.get_submodule(parent), name, self.layers[path])
        skeleton.modula_spec = None  # a row's routing comes from its own member's routers
        skeleton.modula_serving_routers = []

    def join(self, model) -> None:
        """Add ``model`` (a composition in serving form over this bank's W0) as a member."""
        if model in self.adapters or getattr(model, "modula_spec", None) is None:
            return
        adapters = {path: module for path, module in model.named_modules() if isinstance(module, ServingLinear)}
        for path, module in adapters.items():
            if path not in self.layers or module.weight is not self.layers[path].weight:
                raise ValueError(f"{path}: not a projection over this bank's base weights")
        self.adapters[model] = adapters

    def leave(self, model) -> None:
        self.adapters.pop(model, None)

    def group(self, members: list) -> list[int]:
        """An order of rows of ``members`` that puts each member's rows together, members' rows first
        (a prefill in this order needs no gather: its rows take their slots in it)."""
        first = {m: i for i, m in reversed(list(enumerate(members))) if m in self.adapters}
        return sorted(range(len(members)), key=lambda i: first.get(members[i], len(members)))

    def route(self, members: list, tokens: int, record: bool = True) -> None:
        """The next forward's rows: ``members[i]`` (a member's model, or one that adapts nothing: the base
        alone) for row ``i``, ``tokens`` each. The rows with adapters are taken grouped by member
        (``order``: their token indices, None when they already are), each member's a contiguous
        ``segment`` through which its adapter runs on its own rows alone. ``group`` orders new rows so.
        A decode step of several members, or with rows of the base between, runs a ``Union`` instead, in
        slot order; ``record``: its routers keep their gates (a row asked for its routing)."""
        groups: dict = {}
        for i, member in enumerate(members):
            if member in self.adapters:
                groups.setdefault(member, []).append(i)
        self.segments, self.local, rows, start = [], {}, [], 0
        self.members = tuple(groups)
        self.present = tuple(member for member in self.adapters if member in groups)
        index_of = {member: k for k, member in enumerate(self.present)}
        self.member_of_row = [index_of.get(member, -1) for member in members]
        self._masks = {}
        for member, indices in groups.items():
            self.segments.append((len(indices), start * tokens, (start + len(indices)) * tokens))
            self.local.update({i: k for k, i in enumerate(indices)})
            rows += indices
            start += len(indices)
        self.rows_of = [torch.tensor(groups[member]) for member in self.present] if record else None
        if rows == list(range(len(rows))):   # already grouped, adapted rows first: slices, no gather
            self.order = None
        else:
            index = torch.tensor(rows)
            self.order = (index[:, None] * tokens + torch.arange(tokens)).reshape(-1)
        self.mixed = self.unite and (len(self.segments) > 1 or self.order is not None)

    def masks(self, union: Union) -> tuple[torch.Tensor, torch.Tensor]:
        """``union.masks`` for this step's rows, made once per step for every projection alike."""
        if union.signature not in self._masks:
            self._masks[union.signature] = union.masks(self.member_of_row)
        return self._masks[union.signature]
