"""``train_loop_per_worker``: the one loop every stage runs inside ``TorchTrainer``.

build model (inject + load parts + set_stage) -> read the split from Ray Data -> tokenise
-> restore the latest checkpoint if Ray restarted us -> train -> rank 0 saves the parts
atomically -> final report. Every rank calls ``ray.train.report`` at the same steps.

The worker's stdout and stderr go to ``RUN_DIR/logs/<stage>.rank<r>.log``. Timing is taken
here, where the work happens: the wall clock at the start of the first optimizer step and at
the end of the last (kept in the checkpointed counters, so a resumed run keeps its start),
reduced over ranks to the earliest start and the latest end.
"""
from __future__ import annotations

import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..compose import build_model
from ..data.formatting import collate, encode_rows, pack
from ..experts import forward_parameter_count, save_part, trainable_parameters
from ..experts.serialization import part_tensors, tensors_sha256
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


def _gather(value, world: int) -> list:
    """``value`` of every rank, in rank order."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def _redirect_output(task: StageTask, rank: int) -> None:
    """This worker's stdout/stderr (ours, Ray's, DeepSpeed's, warnings) -> the run folder's logs."""
    logs = Path(task.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handle = open(logs / f"{task.slug}.rank{rank}.log", "a", buffering=1)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)


def _saved_digests(task: StageTask, module) -> dict[str, str]:
    """sha256 of each part this task saves, from the live (for ZeRO-3: gathered) weights."""
    return {f"{ref.part}:{ref.domain}" if ref.domain else ref.part:
            tensors_sha256(part_tensors(module, ref.part, ref.domain)) for ref in task.save}


def _engine_name(engine) -> str:
    if engine.ds is not None:
        from deepspeed.runtime.engine import DeepSpeedEngine

        if isinstance(engine.ds, DeepSpeedEngine):
            return f"deepspeed-zero{engine.ds.zero_optimization_stage()}"
    return "ddp" if isinstance(engine.model, torch.nn.parallel.DistributedDataParallel) else "torch"


def _validator(task: StageTask, tokenizer):
    """``StageTask.validator`` ("module:Class") built as ``Class(tokenizer, task)``, or None."""
    if not task.validator:
        return None
    import importlib

    module, _, name = task.validator.partition(":")
    return getattr(importlib.import_module(module), name)(tokenizer, task)


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
    if task.log_to_files:
        _redirect_output(task, rank)
    torch.set_num_threads(hp["scaling"].get("torch_threads") or max(1, int(
        (hp["scaling"].get("resources_per_worker") or {}).get("CPU", 1))))
    device = get_device()
    _seed_all(task.seed)  # identical adapter init on every rank
    model, tokenizer = build_model(task.base_model, task.method, task.domains, task.experts, load=task.load,
                                   stage=task.stage, dtype=task.dtype)
    model.to(device).train()
    if hp.get("compile"):  # outputs equal eager's (tests/unit/test_layers.py); PERFORMANCE.md has the cost
        model.forward = torch.compile(model.forward)

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
    n_trainable, n_forward = sum(p.numel() for p in params.values()), forward_parameter_count(model)
    engine = make_engine(model, params, hp, world, task.dtype)
    validate, validation = _validator(task, tokenizer), {}

    step, resumed_from = 0, None
    counters = {"tokens": 0, "response_tokens": 0, "loss": float("nan"), "first_loss": None,
                "train_started_at": None, "train_ended_at": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step, restored = checkpointing.restore(Path(folder), rank=rank, params=params,
                                                   optimizer=engine.optimizer, scheduler=engine.scheduler,
                                                   engine=engine.ds)
        counters.update(restored)
        resumed_from = step
        if rank == 0:
            print(f"[{task.key}] resumed from step {step}", flush=True)

    observer, total = Observer(task, rank), hp["steps"]
    window_start, window_tokens, loss_sum, aux_sum, micro_count = time.perf_counter(), 0, 0.0, 0.0, 0
    while step < total:
        if counters["train_started_at"] is None:
            counters["train_started_at"] = time.time()
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
        counters["train_ended_at"] = time.time()
        if counters["first_loss"] is None:  # the loss of step 1's batches under the initial weights
            counters["first_loss"] = _all_reduce([loss_sum / micro_count], "SUM", world, device)[0] / world
        if hp.get("crash_at_step") == step and rank == 0:
            marker = Path(task.run_dir) / f".crashed-{task.slug}-step{step}"
            if not marker.exists():  # fault injection for resume tests: die once, hard
                marker.touch()
                # Ray Train's controller collects reports (and registers checkpoints) once per health
                # check; die only after the last checkpoint had one, as a real crash later would.
                time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0)
                os._exit(1)
        log_now, save_now = step % hp["log_every"] == 0 or step == total, step % hp["checkpoint_every"] == 0
        if not (log_now or save_now):
            continue
        loss, aux, tokens = _all_reduce([loss_sum / micro_count, aux_sum / micro_count, window_tokens], "SUM",
                                        world, device)
        elapsed = time.perf_counter() - window_start
        metrics = {"step": step, "loss": loss / world, "aux": aux / world, "lr": engine.lr(),
                   "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if validate is not None:  # on every rank: the forward is collective under ZeRO-3
            validation = validate(engine.module)
            metrics.update(validation)
        observer.log(step, total, metrics)
        counters["loss"] = metrics["loss"]
        if save_now and step < total:
            with tempfile.TemporaryDirectory() as folder:
                checkpointing.write(Path(folder), rank=rank, step=step, counters=counters, params=params,
                                    optimizer=engine.optimizer, scheduler=engine.scheduler, engine=engine.ds)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        # the next window's tokens/s counts training only; train_s (the whole window) includes reports
        window_start, window_tokens, loss_sum, aux_sum, micro_count = time.perf_counter(), 0, 0.0, 0.0, 0

    if validate is not None and not validation:  # resumed after the last step: validate the final weights
        validation = validate(engine.module)
    with engine.full_parameters():
        if rank == 0:
            for ref in task.save:
                save_part(engine.module, ref.part, ref.path, domain=ref.domain, metadata=task.metadata)
        digests = _gather(_saved_digests(task, engine.module), world)
    tokens, response_tokens = _all_reduce([counters["tokens"], counters["response_tokens"]], "SUM", world, device)
    peak = _all_reduce([_peak_memory_mb(device)], "MAX", world, device)[0]
    started = _all_reduce([counters["train_started_at"]], "MIN", world, device)[0]
    ended = _all_reduce([counters["train_ended_at"]], "MAX", world, device)[0]
    observer.close()
    final = {"step": step, "loss": counters["loss"], "first_loss": counters["first_loss"], "tokens": int(tokens),
             "response_tokens": int(response_tokens), "trainable_params": n_trainable, "forward_params": n_forward,
             "peak_mem_mb": round(peak, 1), "examples": len(examples), "truncated": stats.truncated,
             "dropped": stats.dropped, "train_started_at": started, "train_ended_at": ended,
             "resumed_from_step": resumed_from, "engine": _engine_name(engine),
             "rank_nodes": _gather(ray.get_runtime_context().get_node_id(), world),
             "rank_part_sha256": digests, **validation, "final_report": True}
    with tempfile.TemporaryDirectory() as folder:
        checkpointing.write(Path(folder), rank=rank, step=step, counters=counters, params=params,
                            optimizer=engine.optimizer, scheduler=engine.scheduler, engine=engine.ds)
        ray.train.report(final, checkpoint=Checkpoint.from_directory(folder))
