"""Cost ledger: one record per stage run (and per expert), and the pluggability comparison.

FLOPs per processed token, forward + backward, frozen base included: the forward costs
``2 N`` (N = all parameters); the backward needs activation gradients through the whole
network (adapters sit in every block), ``2 N``, plus weight gradients of the trainable
parameters only, ``2 N_train``. So ``flops = (4 N + 2 N_train) * tokens``.

The paper's pluggability metric for adding a domain is trainable params x training tokens.
"""
from __future__ import annotations

LEDGER_STAGES = ("universal", "experts", "router", "joint")


def training_flops(total_params: int, trainable_params: int, tokens: int) -> int:
    return int((4 * total_params + 2 * trainable_params) * tokens)


def make_record(*, stage: str, domain: str | None, event: str, metrics: dict, num_workers: int,
                started_at: float, ended_at: float, run_name: str) -> dict:
    wall = ended_at - started_at
    return {"stage": stage, "domain": domain, "event": event, "run_name": run_name,
            "trainable_params": int(metrics["trainable_params"]), "tokens": int(metrics["tokens"]),
            "flops": training_flops(metrics["total_params"], metrics["trainable_params"], metrics["tokens"]),
            "wall_s": round(wall, 3), "worker_s": round(wall * num_workers, 3), "num_workers": num_workers,
            "peak_mem_mb": metrics["peak_mem_mb"], "started_at": round(started_at, 3),
            "ended_at": round(ended_at, 3), "final_loss": metrics.get("loss"), "nodes": metrics.get("nodes", [])}


def event_cost(ledger: list[dict], event: str) -> dict:
    """Totals of one event's records; wall time is the critical path (first start to last end)."""
    records = [r for r in ledger if r["event"] == event]
    if not records:
        raise KeyError(event)
    return {"event": event, "records": len(records),
            "params_x_tokens": sum(r["trainable_params"] * r["tokens"] for r in records),
            "flops": sum(r["flops"] for r in records),
            "wall_s": max(r["ended_at"] for r in records) - min(r["started_at"] for r in records),
            "worker_s": sum(r["worker_s"] for r in records)}


def overlaps(a: dict, b: dict) -> bool:
    return a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]


def format_ledger(ledger: list[dict]) -> str:
    lines = [f"{'event':<22} {'stage':<9} {'domain':<10} {'trainable':>11} {'tokens':>9} {'TFLOP':>9} "
             f"{'wall s':>8} {'worker s':>9} {'peak MB':>8}"]
    for r in ledger:
        lines.append(f"{r['event']:<22} {r['stage']:<9} {str(r['domain'] or '-'):<10} {r['trainable_params']:>11,} "
                     f"{r['tokens']:>9,} {r['flops'] / 1e12:>9.3f} {r['wall_s']:>8.1f} {r['worker_s']:>9.1f} "
                     f"{r['peak_mem_mb']:>8.0f}")
    return "\n".join(lines)


def compare(mine: dict, theirs: dict) -> dict:
    return {"params_x_tokens_ratio": mine["params_x_tokens"] / max(theirs["params_x_tokens"], 1),
            "flops_ratio": mine["flops"] / max(theirs["flops"], 1),
            "wall_ratio": mine["wall_s"] / max(theirs["wall_s"], 1e-9),
            "worker_ratio": mine["worker_s"] / max(theirs["worker_s"], 1e-9)}
