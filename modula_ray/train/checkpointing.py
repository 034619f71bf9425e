"""Exact resume: trainable weights, optimizer, scheduler, step, and every rank's RNG and counters.

Rank 0 writes ``state.pt``; every rank writes ``rank<r>.pt`` (RNG state, token counters) into its
own folder; Ray Train merges the folders of one report into one checkpoint. With DeepSpeed the
engine writes its own (sharded) weights and optimizer under ``deepspeed/`` on every rank.

Our files load with ``torch.load(weights_only=True)``: whoever can write checkpoint storage cannot
make the workers run code through them (DeepSpeed reads its own ``deepspeed/`` files itself).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so that ``torch.load(weights_only=True)`` reads it."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(folder: Path, *, rank: int, step: int, counters: dict, params: dict[str, torch.Tensor],
          optimizer=None, scheduler=None, engine=None) -> None:
    """Write this rank's share of the checkpoint of ``step`` into ``folder``."""
    torch.save({"rng": rng_state(), "counters": dict(counters)}, folder / f"rank{rank}.pt")
    if engine is not None:  # DeepSpeed: every rank saves its partition
        engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
    if rank == 0:
        plain = engine is None
        torch.save({"step": step,
                    "params": {k: v.detach().cpu().clone() for k, v in params.items()} if plain else {},
                    "optimizer": optimizer.state_dict() if plain else None,
                    "scheduler": scheduler.state_dict() if plain else None},
                   folder / STATE_FILE)


def restore(folder: Path, *, rank: int, params: dict[str, torch.Tensor], optimizer=None, scheduler=None,
            engine=None) -> tuple[int, dict]:
    """Load a checkpoint written by ``write``; returns ``(step, this rank's counters)``."""
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)  # tensors and plain values only
    if engine is not None:  # the engine restores weights (possibly partitioned), optimizer and scheduler
        engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
    else:
        with torch.no_grad():
            for name, tensor in params.items():
                tensor.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    own = torch.load(folder / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    set_rng_state(own["rng"])
    return state["step"], own["counters"]
