"""Optimisation back-ends behind one interface: plain/DDP torch, or DeepSpeed ZeRO.

``micro_step(batch, last)`` does forward + backward of one micro-batch (gradients averaged
over ``grad_accum``); ``finish_step()`` clips, steps the optimizer and the LR schedule.
LR: linear warmup over ``warmup_steps``, then cosine decay to 10% of ``lr`` (``schedule.lr_lambda``).
"""
from __future__ import annotations

import contextlib

import torch

from ..objective import causal_lm_loss
from .schedule import lr_lambda


def weights_changed(params) -> None:
    """Mark ``params`` as modified in place. Fused AdamW and DeepSpeed write the weights without
    bumping autograd's version counter, which the expert layers' no-grad caches key on
    (``ExpertLinear.fused``): without this, a validation forward between steps reads stale weights."""
    torch.autograd.graph.increment_version(list(params))


def lr_schedule(optimizer, hp: dict):
    """``LambdaLR`` over ``schedule.lr_lambda``: warmup, then cosine decay to 10% of ``lr``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp["warmup_steps"], hp["steps"]))


class TorchEngine:
    """AdamW (fused) over the trainable parameters; DDP via ``ray.train.torch.prepare_model`` when world > 1."""

    ds = None

    def __init__(self, model, params: dict, hp: dict, world: int, clip=torch.nn.utils.clip_grad_norm_):
        self.hp, self.params, self.clip = hp, list(params.values()), clip  # clip(params, max_norm)
        if world > 1:
            from ray.train.torch import prepare_model

            # Experts that a top-k router skips get no gradient: DDP must not wait for them.
            model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
        self.model = model
        self.module = getattr(model, "module", model)
        # fused: one kernel over all parameters; the default loops over them (1,050 tensors for SmolLM2
        # with 1 + 4 experts: 4x slower, docs/PERFORMANCE.md)
        self.optimizer = torch.optim.AdamW(self.params, lr=hp["lr"], weight_decay=hp["weight_decay"], fused=True)
        self.scheduler = lr_schedule(self.optimizer, hp)

    def micro_step(self, batch: dict, last: bool) -> dict:
        sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            loss, stats = causal_lm_loss(self.model, batch, self.hp["aux_loss_coef"], self.hp["route_loss_coef"])
            (loss / self.hp["grad_accum"]).backward()
        return stats

    def finish_step(self) -> None:
        if self.hp["max_grad_norm"]:
            self.clip(self.params, self.hp["max_grad_norm"])
        self.optimizer.step()
        weights_changed(self.params)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @contextlib.contextmanager
    def full_parameters(self):
        yield


class DeepSpeedEngine(TorchEngine):
    """``deepspeed.initialize`` inside the loop (no prepare_model); ZeRO stage from the config."""

    def __init__(self, model, params: dict, hp: dict, world: int, dtype: str):
        import deepspeed

        self.hp, self.params = hp, list(params.values())
        extra = dict(hp["deepspeed"])
        zero_stage = extra.pop("zero_stage", 2)
        config = {"train_micro_batch_size_per_gpu": hp["batch_size"],
                  "gradient_accumulation_steps": hp["grad_accum"],
                  "zero_optimization": {"stage": zero_stage},
                  # torch_adam off CUDA: DeepSpeed would JIT-compile its CPU fused Adam (80 s on 2 cores)
                  "optimizer": {"type": "AdamW", "params": {"lr": hp["lr"], "weight_decay": hp["weight_decay"],
                                                            "torch_adam": not torch.cuda.is_available()}},
                  "gradient_clipping": hp["max_grad_norm"] or 0.0,
                  "bf16": {"enabled": dtype == "bfloat16"}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        config.update(extra)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=self.params, config=config,
            lr_scheduler=lambda optimizer: lr_schedule(optimizer, hp))
        self.model, self.module = self.ds, self.ds.module
        self.zero_stage = zero_stage

    def micro_step(self, batch: dict, last: bool) -> dict:
        loss, stats = causal_lm_loss(self.ds, batch, self.hp["aux_loss_coef"], self.hp["route_loss_coef"])
        self.ds.backward(loss)  # DeepSpeed scales by gradient_accumulation_steps itself
        self.ds.step()          # a no-op until the accumulation boundary
        if last:
            weights_changed(self.params)
        return stats

    def finish_step(self) -> None:
        pass

    @contextlib.contextmanager
    def full_parameters(self):
        """ZeRO-3 partitions weights: gather them (on every rank) while rank 0 saves."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
                yield
        else:
            yield


def make_engine(model, params: dict, hp: dict, world: int, dtype: str, clip=None):
    """``clip``: the torch engine's gradient clipping, ``clip(params, max_norm)`` (default: one norm
    over all of them; stage 2 trained together clips each expert on its own)."""
    if hp.get("deepspeed") is not None:
        return DeepSpeedEngine(model, params, hp, world, dtype)
    return TorchEngine(model, params, hp, world, **({"clip": clip} if clip else {}))
