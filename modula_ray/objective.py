"""Training objective, shared by every stage: next-token cross-entropy on response tokens, an
optional Switch load-balancing term and an optional supervised routing term,

    ``L = CE + c_aux * mean_routers(n sum_i f_i P_i) + c_route * mean_routers(mean_t -log P_{label_t})``,

where ``label_t`` is the routed expert of token t's row domain (``batch["route_labels"]``, -100
for tokens without one; ``data/formatting.py``). The paper's router learns from CE alone
(``c_route = 0``, the default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.formatting import IGNORE_INDEX
from .experts.inject import gate_entropy, load_balancing_loss, supervised_routing_loss


def causal_lm_loss(model, batch: dict, aux_loss_coef: float = 0.0, route_loss_coef: float = 0.0
                   ) -> tuple[torch.Tensor, dict]:
    """``batch``: ``input_ids``, ``attention_mask``, ``labels`` (prompt and padding at -100),
    ``position_ids`` for packed rows, and ``route_labels`` when ``route_loss_coef`` is set.

    Returns the loss to back-propagate and numbers for logging: ``ce``, ``aux``, ``route``,
    ``entropy`` (the routers' normalised gate entropy, None without a router), ``tokens``
    (response tokens scored) and ``input_tokens`` (tokens processed).
    """
    if "position_ids" in batch:  # packed rows: with no mask and no cache, transformers masks block-diagonally
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    scored = (labels != IGNORE_INDEX).sum()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum") / scored.clamp(min=1)
    aux = load_balancing_loss(model).to(ce.device)
    loss = ce + aux_loss_coef * aux if aux_loss_coef else ce
    route = torch.zeros((), device=ce.device)
    if route_loss_coef:
        if "route_labels" not in batch:
            raise ValueError("route_loss_coef is set but the batch has no route_labels")
        route = supervised_routing_loss(model, batch["route_labels"]).to(ce.device)
        loss = loss + route_loss_coef * route
    return loss, {"ce": ce.item(), "aux": aux.item(), "route": route.item(), "entropy": gate_entropy(model),
                  "tokens": int(scored),
                  "input_tokens": int(batch["attention_mask"].sum())}
