"""``train_loop_per_worker``: the one loop every stage runs inside ``TorchTrainer``, in Ray-free parts.

``setup`` (seed, build model: inject + load parts + set_stage, tokenise, engine) -> ``resume``
from the latest checkpoint if Ray restarted us -> ``train_step`` until ``steps``, with a report
(and every ``checkpoint_every`` steps a ``save_checkpoint``) -> ``finish``: rank 0 saves the
parts atomically -> final report. Only ``train_loop_per_worker`` talks to Ray; every rank calls
``ray.train.report`` at the same steps.

The worker's stdout and stderr go to ``RUN_DIR/logs/<stage>.rank<r>.log``. Timing is taken
here, where the work happens: the wall clock at the start of the first optimizer step and at
the end of the last (kept in the checkpointed counters, so a resumed run keeps its start),
reduced over ranks to the earliest start and the latest end. Where the start-up went is taken
too (``startup_phases``, the latest rank, this attempt): the moment the worker started importing
this module (Ray Train's part ends there), entered the loop (this module's imports), and was
ready to step (model built and loaded, rows read and tokenised, engine made, checkpoint resumed).
"""
from __future__ import annotations

import time

MODULE_LOADING_AT = time.time()  # a Ray Train worker imports this module when it unpickles the train function

import os
import resource
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compose import build_model
from ..data.formatting import EncodeStats, collate, encode_rows, pack
from ..experts import forward_parameter_count, method_class, save_part, trainable_parameters
from ..experts.inject import forced_expert
from ..experts.router_fit import describe as describe_fit, fit_routers, rows_to_fit
from ..experts.serialization import part_tensors, tensors_sha256
from ..hooks import hook, imported
from . import checkpointing, together
from .engine import make_engine, weights_changed
from .observe import Observer
from .schedule import BatchSchedule
from .task import StageTask


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (``transformers.set_seed`` does the same, but importing
    it imports ``transformers.trainer_utils`` and with it peft: seconds in every Ray worker)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Window:
    """Sums over the micro-batches since the last report."""

    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    loss: float = 0.0
    aux: float = 0.0
    route: float = 0.0
    entropy: float = 0.0                # 0 without a router
    micro_batches: int = 0
    group_loss: list[float] = field(default_factory=list)  # stage 2 together: each domain's


@dataclass
class TrainState:
    """One worker's training. A checkpoint keeps ``step`` and ``counters`` (with the weights,
    optimizer, LR schedule and RNG); ``window`` is what the next report averages."""

    task: StageTask
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    examples: list
    stats: EncodeStats
    schedule: BatchSchedule
    engine: object                 # engine.TorchEngine or engine.DeepSpeedEngine
    params: dict[str, torch.Tensor]
    trainable_params: int
    forward_params: int
    validate: Callable | None      # the task's validator: model -> metrics
    step: int = 0
    resumed_from: int | None = None
    counters: dict = field(default_factory=lambda: {
        "tokens": 0, "response_tokens": 0, "loss": float("nan"), "first_loss": None,
        "train_started_at": None, "train_ended_at": None})
    window: Window = field(default_factory=Window)
    validation: dict = field(default_factory=dict)
    routes: list[int] | None = None     # stage 2 together: each domain's routed expert (together.py)
    domain_stats: dict = field(default_factory=dict)  # stage 2 together: each domain's rows
    phases: dict = field(default_factory=dict)  # this attempt's start-up clock: loading, entered, ready
    route_init: dict | None = None      # route_init_rows: what fitting the routers took (router_fit.py)


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


def setup(task: StageTask, rows: list[dict], *, rank: int = 0, world: int = 1,
          device: torch.device = torch.device("cpu")) -> TrainState:
    """Everything before the first step. ``rows``: the split's rows sorted by id. The seed comes
    first, so every rank starts from the same adapter init."""
    hp = task.hparams
    seed_everything(task.seed)
    grouped = together.is_together(task)
    model, tokenizer = build_model(task.base_model, task.method, task.domains, task.experts, load=task.load,
                                   stage="joint" if grouped else task.stage, dtype=task.dtype)
    own = domain_stats = None
    if grouped:  # every domain's expert in one model, each domain's rows through its own (together.py)
        together.train_only_domain_experts(model)
        routed = method_class(task.method).route_labels(task.domains, task.domains)
        own = [routed[d] for d in task.domains]
    model.to(device).train()
    if hp.get("compile"):  # outputs equal eager's (tests/unit/test_layers.py); PERFORMANCE.md has the cost
        model.forward = torch.compile(model.forward)

    if grouped:
        examples, stats, schedule, domain_stats = together.encode_groups(task, rows, tokenizer, world=world, rank=rank)
    else:
        labelled = hp["route_loss_coef"] or hp.get("route_init_rows")
        routes = method_class(task.method).route_labels(task.domains, task.data_domains) if labelled else None
        examples, stats = encode_rows(rows, tokenizer, task.max_length, routes)
    if rank == 0 and (stats.truncated or stats.dropped):
        print(f"[{task.key}] tokenised: {stats.summary()}", flush=True)
    if not examples:
        raise ValueError(f"[{task.key}] no training example has a response token within "
                         f"max_length={task.max_length}: {stats.summary()}; raise data.max_length")
    route_init = None
    if not grouped and hp.get("route_init_rows"):  # the routers fitted to the domain labels first
        fitted, _ = encode_rows(rows_to_fit(rows, hp["route_init_rows"], routes), tokenizer, task.max_length, routes)
        route_init = fit_routers(model, fitted, task.seed)
        if rank == 0:
            print(f"[{task.key}] {describe_fit(route_init)}", flush=True)
    if not grouped:
        examples = pack(examples, task.max_length) if task.pack else examples
        schedule = BatchSchedule(len(examples), world=world, rank=rank, batch_size=hp["batch_size"],
                                 grad_accum=hp["grad_accum"], seed=task.seed)
    params = trainable_parameters(model)
    trainable, forward = sum(p.numel() for p in params.values()), forward_parameter_count(model)
    engine = make_engine(model, params, hp, world, task.dtype, clip=together.clip_per_expert if grouped else None)
    validate = imported(task.validator)(tokenizer, task) if task.validator else None
    return TrainState(task=task, rank=rank, world=world, device=device, tokenizer=tokenizer, examples=examples,
                      stats=stats, schedule=schedule, engine=engine, params=params, trainable_params=trainable,
                      forward_params=forward, validate=validate, routes=own, domain_stats=domain_stats or {},
                      route_init=route_init)


def train_step(state: TrainState) -> None:
    """Optimizer step ``state.step``: its ``grad_accum`` micro-batches from the schedule, then clip,
    step and advance the LR. Adds to the counters and the window; the first step done also sets
    ``first_loss`` (step 1's batches under the initial weights, averaged over ranks)."""
    hp, counters, window = state.task.hparams, state.counters, state.window
    if counters["train_started_at"] is None:
        counters["train_started_at"] = time.time()
    for micro in range(hp["grad_accum"]):
        last = micro == hp["grad_accum"] - 1
        if state.routes is None:
            out = _micro_step(state, state.schedule.indices(state.step, micro), last)
        else:  # stage 2 together: each domain's micro-batch through its own expert, gradients adding up
            outs = []
            for group, indices in enumerate(state.schedule.groups(state.step, micro)):
                with forced_expert(state.engine.module, state.routes[group]):
                    outs.append(_micro_step(state, indices, last and group == len(state.routes) - 1))
            window.group_loss = [a + o["ce"] for a, o in zip(window.group_loss or [0.0] * len(outs), outs)]
            counters["domain_tokens"] = [a + o["input_tokens"] for a, o in
                                         zip(counters.get("domain_tokens") or [0] * len(outs), outs)]
            # no router trains here: the forced gates' aux and entropy mean nothing, so none are logged
            out = {key: sum(o[key] for o in outs) for key in ("input_tokens", "tokens")} | {
                "ce": sum(o["ce"] for o in outs) / len(outs), "aux": 0.0, "route": 0.0, "entropy": 0.0}
        counters["tokens"] += out["input_tokens"]
        counters["response_tokens"] += out["tokens"]
        window.tokens += out["input_tokens"]
        window.loss += out["ce"]
        window.aux += out["aux"]
        window.route += out["route"]
        window.entropy += out["entropy"] or 0.0
        window.micro_batches += 1
    state.engine.finish_step()
    state.step += 1
    counters["train_ended_at"] = time.time()
    if counters["first_loss"] is None:
        counters["first_loss"] = _all_reduce([window.loss / window.micro_batches], "SUM", state.world,
                                             state.device)[0] / state.world
        if window.group_loss:
            counters["domain_first_loss"] = _domain_means(state, window.group_loss)


def _micro_step(state: TrainState, indices: list[int], last: bool) -> dict:
    batch = collate([state.examples[i] for i in indices], state.tokenizer.pad_token_id)
    return state.engine.micro_step({k: v.to(state.device) for k, v in batch.items()}, last=last)


def report_due(state: TrainState) -> tuple[bool, bool]:
    """``(report, checkpoint)`` after this step: a report every ``log_every`` steps and at the last;
    a checkpoint with it every ``checkpoint_every`` steps before the last (``finish`` saves the last)."""
    hp, step = state.task.hparams, state.step
    checkpoint = step % hp["checkpoint_every"] == 0 and step < hp["steps"]
    return checkpoint or step % hp["log_every"] == 0 or step == hp["steps"], checkpoint


def window_metrics(state: TrainState) -> dict:
    """The report of the window: loss, aux, route and gate entropy (means over its micro-batches,
    then over ranks), lr, tokens/s, and the validator's metrics (run on every rank: its forward is
    collective under ZeRO-3)."""
    window, n = state.window, state.window.micro_batches
    loss, aux, route, entropy, tokens = _all_reduce(
        [window.loss / n, window.aux / n, window.route / n, window.entropy / n, window.tokens], "SUM", state.world,
        state.device)
    elapsed = time.perf_counter() - window.started
    metrics = {"step": state.step, "loss": loss / state.world, "aux": aux / state.world, "route": route / state.world,
               "gate_entropy": entropy / state.world, "lr": state.engine.lr(),
               "tokens_per_s": tokens / max(elapsed, 1e-9)}
    if state.validate is not None:
        state.validation = state.validate(state.engine.module)
        metrics.update(state.validation)
    state.counters.update(loss=metrics["loss"], route=metrics["route"], gate_entropy=metrics["gate_entropy"])
    if window.group_loss:
        state.counters["domain_loss"] = _domain_means(state, window.group_loss)
        metrics.update({f"loss/{domain}": loss for domain, loss in state.counters["domain_loss"].items()})
    return metrics


def _domain_summaries(state: TrainState) -> dict[str, dict]:
    """Stage 2 together: what the manifest records of each domain's expert (as a group of one would)."""
    counters = state.counters
    tokens = _all_reduce(counters["domain_tokens"], "SUM", state.world, state.device)
    return {d: {**state.domain_stats[d], "tokens": int(n), "loss": counters["domain_loss"][d],
                "first_loss": counters["domain_first_loss"][d]} for d, n in zip(state.task.domains, tokens)}


def _domain_means(state: TrainState, sums: list[float]) -> dict[str, float]:
    """Stage 2 together: each domain's loss over the window's micro-batches, averaged over ranks."""
    n = state.window.micro_batches * state.world
    return dict(zip(state.task.domains, (v / n for v in _all_reduce(sums, "SUM", state.world, state.device))))


def save_checkpoint(state: TrainState, folder: Path) -> None:
    """This rank's share of the checkpoint of ``state.step`` (``checkpointing.write``)."""
    engine = state.engine
    checkpointing.write(folder, rank=state.rank, step=state.step, counters=state.counters, params=state.params,
                        optimizer=engine.optimizer, scheduler=engine.scheduler, engine=engine.ds)


def resume(state: TrainState, folder: Path) -> None:
    """Continue from the checkpoint in ``folder``: weights, optimizer, LR, RNG, step and counters."""
    engine = state.engine
    state.step, restored = checkpointing.restore(folder, rank=state.rank, params=state.params,
                                                 optimizer=engine.optimizer, scheduler=engine.scheduler,
                                                 engine=engine.ds)
    weights_changed(state.params.values())  # DeepSpeed loads through .data
    state.counters.update(restored)
    state.resumed_from = state.step
    if state.rank == 0:
        print(f"[{state.task.key}] resumed from step {state.step}", flush=True)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _engine_name(engine) -> str:
    if engine.ds is not None:
        from deepspeed.runtime.engine import DeepSpeedEngine

        if isinstance(engine.ds, DeepSpeedEngine):
            return f"deepspeed-zero{engine.ds.zero_optimization_stage()}"
    return "ddp" if isinstance(engine.model, torch.nn.parallel.DistributedDataParallel) else "torch"


def finish(state: TrainState, node_id: str) -> dict:
    """After the last step: validate the final weights if no report did (resumed after the last
    step), rank 0 saves the task's parts, and the final report's metrics (reduced over ranks;
    ``rank_part_sha256`` and ``rank_nodes``, this worker's ``node_id``, per rank)."""
    task, module, world, device = state.task, state.engine.module, state.world, state.device
    if state.validate is not None and not state.validation:
        state.validation = state.validate(module)
    with state.engine.full_parameters():  # ZeRO-3: the gathered weights
        if state.rank == 0:
            for ref in task.save:
                save_part(module, ref.part, ref.path, domain=ref.domain, metadata=task.metadata)
        digests = _gather({f"{ref.part}:{ref.domain}" if ref.domain else ref.part:
                           tensors_sha256(part_tensors(module, ref.part, ref.domain)) for ref in task.save}, world)
    counters = state.counters
    tokens, response_tokens = _all_reduce([counters["tokens"], counters["response_tokens"]], "SUM", world, device)
    peak = _all_reduce([_peak_memory_mb(device)], "MAX", world, device)[0]
    started = _all_reduce([counters["train_started_at"]], "MIN", world, device)[0]
    ended = _all_reduce([counters["train_ended_at"]], "MAX", world, device)[0]
    names = sorted(state.phases)
    phases = dict(zip(names, _all_reduce([state.phases[n] for n in names], "MAX", world, device)))
    return {"step": state.step, "loss": counters["loss"], "first_loss": counters["first_loss"],
            "route": counters.get("route"), "gate_entropy": counters.get("gate_entropy"),
            "tokens": int(tokens), "response_tokens": int(response_tokens),
            "trainable_params": state.trainable_params, "forward_params": state.forward_params,
            "peak_mem_mb": round(peak, 1), "examples": len(state.examples), "truncated": state.stats.truncated,
            "dropped": state.stats.dropped, "train_started_at": started, "train_ended_at": ended,
            "startup_phases": phases,
            **({"domains": _domain_summaries(state)} if state.domain_stats else {}),
            **({"route_init": state.route_init} if state.route_init else {}),
            "resumed_from_step": state.resumed_from, "engine": _engine_name(state.engine),
            "rank_nodes": _gather(node_id, world), "rank_part_sha256": digests, **state.validation,
            "final_report": True}


def after_step_hook(task: StageTask) -> Callable[[TrainState], None]:
    """``task.after_step`` (set only by tests, ``hooks.py``) as ``hook(state)``."""
    return hook(task.after_step) or (lambda state: None)


def _read_rows(shard) -> list[dict]:
    """Every row of the split, sorted by id so Ray's delivery order cannot change the data order."""
    rows = []
    for batch in shard.iter_batches(batch_size=512, batch_format="pyarrow"):
        rows.extend(batch.select(["id", "domain", "source", "prompt", "response", "meta"]).to_pylist())
    return sorted(rows, key=lambda row: row["id"])


def _redirect_output(task: StageTask, rank: int) -> None:
    """This worker's stdout/stderr (ours, Ray's, DeepSpeed's, warnings) -> the run folder's logs."""
    logs = Path(task.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handle = open(logs / f"{task.slug}.rank{rank}.log", "a", buffering=1)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs: the parts above around Ray's data shard, checkpoints and reports."""
    entered = time.time()
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import get_device
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker helps nobody
    task = StageTask.from_dict(config["task"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if task.log_to_files:
        _redirect_output(task, rank)
    scaling = task.hparams["scaling"]
    torch.set_num_threads(scaling.get("torch_threads") or max(1, int(
        (scaling.get("resources_per_worker") or {}).get("CPU", 1))))
    state = setup(task, _read_rows(ray.train.get_dataset_shard("train")), rank=rank, world=world,
                  device=get_device())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume(state, Path(folder))
    state.phases = {"loading_at": MODULE_LOADING_AT, "entered_at": entered, "ready_at": time.time()}

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, Path(folder))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    after_step, observer, total = after_step_hook(task), Observer(task, rank), task.hparams["steps"]
    while state.step < total:
        train_step(state)
        after_step(state)
        due, with_checkpoint = report_due(state)
        if due:
            metrics = window_metrics(state)
            observer.log(state.step, total, metrics)
            report(metrics, with_checkpoint)
            # the next window's tokens/s counts training only; train_s (the whole window) includes reports
            state.window = Window()
    final = finish(state, ray.get_runtime_context().get_node_id())
    observer.close()
    report(final, with_checkpoint=True)
