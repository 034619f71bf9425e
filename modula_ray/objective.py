"""Training objective, shared by every stage: next-token cross-entropy on response tokens
plus an optional Switch load-balancing term, ``L = CE + c_aux * mean_routers(n sum_i f_i P_i)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .experts.inject import load_balancing_loss

from .data.formatting import IGNORE_INDEX


def causal_lm_loss(model, batch: dict, aux_loss_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """``batch``: ``input_ids``, ``attention_mask``, ``labels`` (prompt and padding at -100),
    and ``position_ids`` for packed rows.

    Returns the loss to back-propagate and numbers for logging: ``ce``, ``aux``, ``tokens``
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
    return loss, {"ce": ce.item(), "aux": aux.item(), "tokens": int(scored),
                  "input_tokens": int(batch["attention_mask"].sum())}
