"""``train_loop_per_worker``: the one loop every stage runs inside ``TorchTrainer``.

build model (inject + load parts + set_stage) -> read the split from Ray Data -> tokenise
-> restore the latest checkpoint if Ray restarted us -> train -> rank 0 saves the parts
atomically -> final report. Every rank calls ``ray.train.report`` at the same steps.
"""
from __future__ import annotations

import os
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..compose import build_model
from ..data.formatting import collate, encode_rows, pack
from ..experts import save_part, trainable_parameters
from . import checkpointing
from .engine import make_engine
from .observe import Observer
from .schedule import BatchSchedule
from .task import StageTask


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _read_rows(shard) -> list[dict]:
    """Every row of the split, sorted by id so Ray's delivery order cannot change the data order."""
    rows = []
    for batch in shard.iter_batches(batch_size=512, batch_format="pyarrow"):
        rows.extend(batch.select(["id", "prompt", "response"]).to_pylist())
    return sorted(rows, key=lambda row: row["id"])


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _all_reduce(values: list[float], op: str, world: int, device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def _node_ids(world: int) -> list[str]:
    """The Ray node of every rank (where the worker group really ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    import torch.distributed as dist

    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return sorted(set(nodes))


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import get_device

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker helps nobody
    task = StageTask.from_dict(config["task"])
    hp = task.hparams
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(hp["scaling"].get("torch_threads") or max(1, int(
        (hp["scaling"].get("resources_per_worker") or {}).get("CPU", 1))))
    device = get_device()
    _seed_all(task.seed)  # identical adapter init on every rank
    model, tokenizer = build_model(task.base_model, task.method, task.domains, task.experts, load=task.load,
                                   stage=task.stage, dtype=task.dtype)
    model.to(device).train()

    examples, stats = encode_rows(_read_rows(ray.train.get_dataset_shard("train")), tokenizer, task.max_length)
    if rank == 0 and (stats.truncated or stats.dropped):
        print(f"[{task.key}] tokenised: {stats.summary()}", flush=True)
    if not examples:
        raise ValueError(f"[{task.key}] no training example has a response token within "
                         f"max_length={task.max_length}: {stats.summary()}; raise data.max_length")
    if task.pack:
        examples = pack(examples, task.max_length)
    schedule = BatchSchedule(len(examples), world=world, rank=rank, batch_size=hp["batch_size"],
                             grad_accum=hp["grad_accum"], seed=task.seed)
    params = trainable_parameters(model)
    n_trainable, n_total = sum(p.numel() for p in params.values()), sum(p.numel() for p in model.parameters())
    engine = make_engine(model, params, hp, world, task.dtype)

    step, counters = 0, {"tokens": 0, "response_tokens": 0, "loss": float("nan")}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step, counters = checkpointing.restore(Path(folder), rank=rank, params=params,
                                                   optimizer=engine.optimizer, scheduler=engine.scheduler,
                                                   engine=engine.ds)
        if rank == 0:
            print(f"[{task.key}] resumed from step {step}", flush=True)

    observer, total = Observer(task, rank), hp["steps"]
    window_start, window_tokens, loss_sum, aux_sum, micro_count = time.perf_counter(), 0, 0.0, 0.0, 0
    while step < total:
        for micro in range(hp["grad_accum"]):
            batch = collate([examples[i] for i in schedule.indices(step, micro)], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = engine.micro_step(batch, last=micro == hp["grad_accum"] - 1)
            counters["tokens"] += out["input_tokens"]
            counters["response_tokens"] += out["tokens"]
            window_tokens += out["input_tokens"]
            loss_sum, aux_sum, micro_count = loss_sum + out["ce"], aux_sum + out["aux"], micro_count + 1
        engine.finish_step()
        step += 1
        if hp.get("crash_at_step") == step and rank == 0:
            marker = Path(task.run_dir) / f".crashed-{task.slug}-step{step}"
            if not marker.exists():  # fault injection for resume tests: die once, hard
                marker.touch()
                os._exit(1)
        log_now, save_now = step % hp["log_every"] == 0 or step == total, step % hp["checkpoint_every"] == 0
        if not (log_now or save_now):
            continue
        loss, aux, tokens = _all_reduce([loss_sum / micro_count, aux_sum / micro_count, window_tokens], "SUM",
                                        world, device)
        elapsed = time.perf_counter() - window_start
        metrics = {"step": step, "loss": loss / world, "aux": aux / world, "lr": engine.lr(),
                   "tokens_per_s": tokens / max(elapsed, 1e-9)}
        observer.log(step, total, metrics)
        counters["loss"] = metrics["loss"]
        window_start, window_tokens, loss_sum, aux_sum, micro_count = time.perf_counter(), 0, 0.0, 0.0, 0
        if save_now and step < total:
            with tempfile.TemporaryDirectory() as folder:
                checkpointing.write(Path(folder), rank=rank, step=step, counters=counters, params=params,
                                    optimizer=engine.optimizer, scheduler=engine.scheduler, engine=engine.ds)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    with engine.full_parameters():
        if rank == 0:
            for ref in task.save:
                save_part(engine.module, ref.part, ref.path, domain=ref.domain, metadata=task.metadata)
    tokens, response_tokens = _all_reduce([counters["tokens"], counters["response_tokens"]], "SUM", world, device)
    peak = _all_reduce([_peak_memory_mb(device)], "MAX", world, device)[0]
    observer.close()
    final = {"step": step, "loss": counters["loss"], "tokens": int(tokens), "response_tokens": int(response_tokens),
             "trainable_params": n_trainable, "total_params": n_total, "peak_mem_mb": round(peak, 1),
             "examples": len(examples), "truncated": stats.truncated, "dropped": stats.dropped,
             "nodes": _node_ids(world), "done": True}
    with tempfile.TemporaryDirectory() as folder:
        checkpointing.write(Path(folder), rank=rank, step=step, counters=counters, params=params,
                            optimizer=engine.optimizer, scheduler=engine.scheduler, engine=engine.ds)
        ray.train.report(final, checkpoint=Checkpoint.from_directory(folder))
