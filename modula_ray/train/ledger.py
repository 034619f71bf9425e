"""Cost ledger: one record per stage run (and per expert), and the pluggability comparison.

Timing is measured where the work happens (DESIGN §7):

``fit_started_at`` / ``fit_ended_at``      the driver's ``trainer.fit()`` call: queueing, worker
                                           start-up, model load, tokenising, training, saving
``train_started_at`` / ``train_ended_at``  inside the workers: start of the first optimizer step to
                                           the end of the last (earliest rank to latest rank);
                                           checkpoint reports in between are included
``startup_s``                              fit start to the first optimizer step, and where it went
                                           (``startup_phases``, this attempt's, the latest rank's):
                                           ``ray_s`` fit start to the worker importing the loop
                                           (Ray Train's controller, worker group, its imports),
                                           ``imports_s`` the loop's imports (torch, ours),
                                           ``setup_s`` model build and load, rows read and tokenised,
                                           engine, resume; the rest to the first step is ``first_step_s``
``worker_started_at``                      the worker importing the training loop (its process is live)
``train_s``                                the worker-side training window
``resource_s``                             ``train_s x num_workers x`` the CPUs (or GPUs, with
                                           ``use_gpu``) each worker requested
``scored_tokens``                          the tokens of ``tokens`` that the loss scored (responses)
``threads_per_worker``                     the torch threads each worker computes on (its
                                           ``torch_threads``, else its whole CPUs, at least 1)

FLOPs per processed token, forward + backward: the forward costs ``2 N`` where N counts only
the parameters that take part in the forward at this stage (frozen base included, inactive
experts and embedding lookups excluded); the backward needs activation gradients through the
whole network (adapters sit in every block), ``2 N``, plus weight gradients of the trainable
parameters only, ``2 N_train``. So ``flops = (4 N + 2 N_train) * tokens``; attention-score
FLOPs (which grow with sequence length) are left out.

With ``route_init_rows`` (``route_init``) the routers' fit before the first step adds its
forward passes, ``2 N`` per input token, to ``flops``; its time is part of ``setup_s``.

The paper's pluggability metric for adding a domain is trainable params x training tokens.
"""
from __future__ import annotations


def training_flops(forward_params: int, trainable_params: int, tokens: int) -> int:
    return int((4 * forward_params + 2 * trainable_params) * tokens)


def startup_phases(metrics: dict, fit_started_at: float) -> dict | None:
    """``{ray_s, imports_s, setup_s, first_step_s}`` from the worker's clock (None without it)."""
    clock = metrics.get("startup_phases")
    if not clock:
        return None
    return {"ray_s": round(clock["loading_at"] - fit_started_at, 3),
            "imports_s": round(clock["entered_at"] - clock["loading_at"], 3),
            "setup_s": round(clock["ready_at"] - clock["entered_at"], 3),
            "first_step_s": round(max(0.0, metrics["train_started_at"] - clock["ready_at"]), 3)}


def make_record(*, stage: str, domain: str | None, event: str, metrics: dict, spec, fit_started_at: float,
                fit_ended_at: float, run_name: str) -> dict:
    """``spec``: the group's ``ScalingSpec``; ``metrics``: the final report of the training loop."""
    requested = spec.worker_resources()
    unit = "GPU" if spec.use_gpu else "CPU"
    train_started, train_ended = metrics["train_started_at"], metrics["train_ended_at"]
    train_s = train_ended - train_started
    fit = metrics.get("route_init")
    return {"stage": stage, "domain": domain, "event": event, "run_name": run_name,
            "trainable_params": int(metrics["trainable_params"]), "forward_params": int(metrics["forward_params"]),
            "tokens": int(metrics["tokens"]), "scored_tokens": int(metrics.get("response_tokens", 0)),
            "flops": training_flops(metrics["forward_params"], metrics["trainable_params"], metrics["tokens"])
            + (2 * int(metrics["forward_params"]) * fit["input_tokens"] if fit else 0),
            "route_init": fit,
            "fit_started_at": round(fit_started_at, 3), "fit_ended_at": round(fit_ended_at, 3),
            "fit_wall_s": round(fit_ended_at - fit_started_at, 3),
            "train_started_at": round(train_started, 3), "train_ended_at": round(train_ended, 3),
            "train_s": round(train_s, 3), "startup_s": round(train_started - fit_started_at, 3),
            "startup_phases": startup_phases(metrics, fit_started_at),
            "worker_started_at": (round(metrics["startup_phases"]["loading_at"], 3)
                                  if metrics.get("startup_phases") else None),
            "num_workers": spec.num_workers, "resources_per_worker": requested, "resource_unit": unit,
            "threads_per_worker": spec.torch_threads or max(1, int(requested.get("CPU", 1))),
            "resource_s": round(train_s * spec.num_workers * requested.get(unit, 0.0), 3),
            "tokens_per_s": round(metrics["tokens"] / max(train_s, 1e-9), 1),
            "peak_mem_mb": metrics["peak_mem_mb"], "first_loss": metrics.get("first_loss"),
            "final_loss": metrics.get("loss"), "resumed_from_step": metrics.get("resumed_from_step"),
            "engine": metrics.get("engine"), "nodes": sorted(set(metrics.get("rank_nodes", []))),
            "rank_part_sha256": metrics.get("rank_part_sha256", [])}


def event_cost(ledger: list[dict], event: str) -> dict:
    """Totals of one event's records; times are critical paths (first start to last end)."""
    records = [r for r in ledger if r["event"] == event]
    if not records:
        raise KeyError(event)
    return {"event": event, "records": len(records),
            "trainable_params": max(r["trainable_params"] for r in records),
            "tokens": sum(r["tokens"] for r in records),
            "scored_tokens": sum(r.get("scored_tokens", 0) for r in records),
            "params_x_tokens": sum(r["trainable_params"] * r["tokens"] for r in records),
            "flops": sum(r["flops"] for r in records),
            "fit_wall_s": max(r["fit_ended_at"] for r in records) - min(r["fit_started_at"] for r in records),
            "train_s": max(r["train_ended_at"] for r in records) - min(r["train_started_at"] for r in records),
            "startup_s": sum(r["startup_s"] for r in records),
            "resource_s": sum(r["resource_s"] for r in records)}


def overlaps(a: dict, b: dict, since: str = "train_started_at") -> bool:
    """Did the two records' worker-side windows overlap in time? A window ends at the last optimizer
    step; it starts at the first (``train_started_at``, the training windows) or, with
    ``since="worker_started_at"``, when the worker began importing the loop (the worker groups' lives)."""
    return a[since] < b["train_ended_at"] and b[since] < a["train_ended_at"]


def format_ledger(ledger: list[dict]) -> str:
    lines = [f"{'event':<20} {'stage':<9} {'domain':<10} {'trainable':>10} {'tokens':>8} {'TFLOP':>7} "
             f"{'start s':>7} {'(Ray s)':>7} {'train s':>7} {'res s':>7} {'tok/s':>7} {'peak MB':>7}"]
    for r in ledger:
        ray_s = (r.get("startup_phases") or {}).get("ray_s")
        ray = f"{ray_s:>7.1f}" if ray_s is not None else f"{'-':>7}"
        lines.append(f"{r['event']:<20} {r['stage']:<9} {str(r['domain'] or '-'):<10} {r['trainable_params']:>10,} "
                     f"{r['tokens']:>8,} {r['flops'] / 1e12:>7.3f} {r['startup_s']:>7.1f} {ray} {r['train_s']:>7.1f} "
                     f"{r['resource_s']:>7.1f} {r['tokens_per_s']:>7,.0f} {r['peak_mem_mb']:>7.0f}")
    return "\n".join(lines)


def compare(mine: dict, theirs: dict) -> dict:
    return {"params_x_tokens_ratio": mine["params_x_tokens"] / max(theirs["params_x_tokens"], 1),
            "flops_ratio": mine["flops"] / max(theirs["flops"], 1),
            "fit_wall_ratio": mine["fit_wall_s"] / max(theirs["fit_wall_s"], 1e-9),
            "train_ratio": mine["train_s"] / max(theirs["train_s"], 1e-9),
            "resource_ratio": mine["resource_s"] / max(theirs["resource_s"], 1e-9)}
