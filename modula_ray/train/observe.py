"""What rank 0 shows while training: a log line, TensorBoard scalars and Ray dashboard metrics.

Log line: ``[experts/math] step 20/40 loss 1.234 aux 0.000 lr 9.1e-04 1,234 tok/s``.
TensorBoard events go to ``RUN_DIR/tensorboard/<stage>``; the gauges
``modula_ray_train_loss`` / ``_tokens_per_second`` / ``_lr`` (tags: run, stage) reach the
Ray dashboard's metrics view through Ray's Prometheus exporter.
"""
from __future__ import annotations

from pathlib import Path


class Observer:
    def __init__(self, task, rank: int):
        self.task, self.active = task, rank == 0
        self.writer, self.gauges = None, {}
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(task.tensorboard_dir or str(Path(task.run_dir) / "tensorboard" / task.slug))
        try:
            from ray.util.metrics import Gauge

            tags = ("run", "stage")
            self.gauges = {name: Gauge(f"modula_ray_train_{name}", description=f"modula-ray training {name}",
                                       tag_keys=tags) for name in ("loss", "tokens_per_second", "lr")}
        except Exception:  # noqa: BLE001 - metrics are best effort (e.g. no metrics agent)
            self.gauges = {}

    def log(self, step: int, total: int, metrics: dict) -> None:
        if not self.active:
            return
        validation = f" val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        route = f" route {metrics['route']:.3f}" if self.task.hparams.get("route_loss_coef") else ""
        entropy = f" entropy {metrics['gate_entropy']:.3f}" if metrics.get("gate_entropy") else ""
        print(f"[{self.task.key}] step {step}/{total} loss {metrics['loss']:.4f} aux {metrics['aux']:.3f}{route}"
              f"{entropy} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tok/s{validation}", flush=True)
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{self.task.key}/{name}", value, step)
        tags = {"run": self.task.metadata.get("run_id", ""), "stage": self.task.key}
        for name, gauge in self.gauges.items():
            gauge.set(float(metrics[{"tokens_per_second": "tokens_per_s"}.get(name, name)]), tags=tags)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
