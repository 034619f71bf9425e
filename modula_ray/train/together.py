"""Stage 2 with every domain expert in one worker group over one shared base (``stages.experts.together``,
the mLoRA pattern), held to be the same training as a group per expert.

One model holds the n domain experts (and the frozen universal expert), set to the mixture's
forward; each domain's micro-batch runs with every router forced onto that domain's expert
(``experts.inject.forced_expert``), so for modula_res ``y = W0 x + h + s B_d LeakyReLU(A_d h)``
and for modula_flan ``y = W0 x + s B_d A_d x``: the stage-2 forward of a group of one. Only the
domain experts train.

An optimizer step runs, for each domain in turn, the micro-batch that domain's own group would
run (its own ``BatchSchedule`` over its own rows, same seed), forward and backward, so the
gradients add up to that of ``L = sum_d CE_d``: expert d's gradient is its own group's. AdamW is
elementwise and the gradient is clipped per expert (``clip_per_expert``), so each expert takes
the steps its own group would. A domain's rows are never padded to another domain's length.
What differs: one process, one Ray Train start-up and one model load instead of n, and each
expert's A starts from its own slice of one seeded init (a group of one starts every domain's
expert from the same draw).
"""
from __future__ import annotations

import torch

from ..data.formatting import EncodeStats, encode_rows, pack
from .schedule import BatchSchedule


def is_together(task) -> bool:
    """A stage-2 task holding several domains trains them together (``stages.experts.tasks``)."""
    return task.stage == "experts" and len(task.domains) > 1


def train_only_domain_experts(model) -> None:
    """Freeze everything but the domain experts (the model was built for the mixture's forward)."""
    from ..experts.inject import expert_layers

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in expert_layers(model).values():
        layer.domain.requires_grad_(True)


class GroupSchedule:
    """One ``BatchSchedule`` per domain over its own rows; ``groups(step, micro)`` gives each
    domain's micro-batch, in domain order, as indices into the concatenated example list."""

    def __init__(self, sizes: list[int], **schedule):
        self.schedules = [BatchSchedule(n, **schedule) for n in sizes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def groups(self, step: int, micro: int) -> list[list[int]]:
        return [[offset + i for i in schedule.indices(step, micro)]
                for offset, schedule in zip(self.offsets, self.schedules)]


def clip_per_expert(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradient of each domain expert (axis 0 of every domain tensor) to ``max_norm`` on
    its own, as ``torch.nn.utils.clip_grad_norm_`` clips a group of one; returns the n norms."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype).view(-1, *[1] * (grad.dim() - 1)))
    return norms


def encode_groups(task, rows: list[dict], tokenizer, *, world: int, rank: int):
    """``(examples, stats, schedule, per-domain stats)``: each domain's rows encoded (and packed)
    on their own, concatenated in ``task.domains`` order."""
    examples, total, by_domain = [], EncodeStats(), {}
    for domain in task.domains:
        mine, stats = encode_rows([r for r in rows if r["domain"] == domain], tokenizer, task.max_length)
        if not mine:
            raise ValueError(f"[{task.key}] {domain}: no training example has a response token within "
                             f"max_length={task.max_length}: {stats.summary()}")
        examples.append(pack(mine, task.max_length) if task.pack else mine)
        by_domain[domain] = {"examples": len(examples[-1]), "truncated": stats.truncated, "dropped": stats.dropped}
        for name in ("examples", "truncated", "prompt_cut", "response_cut", "dropped", "tokens", "response_tokens"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
    hp = task.hparams
    schedule = GroupSchedule([len(e) for e in examples], world=world, rank=rank, batch_size=hp["batch_size"],
                             grad_accum=hp["grad_accum"], seed=task.seed)
    return [e for group in examples for e in group], total, schedule, by_domain
