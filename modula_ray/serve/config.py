"""The serve configuration: one YAML file in Ray Serve's own config format.

``cluster/serve.yaml`` is what ``serve deploy`` / ``serve run`` read on a cluster, and what
``modula-ray serve --config`` reads locally::

    http_options: {host: 0.0.0.0, port: 8000, request_timeout_s: 300}   # Serve's backstop
    applications:
      - name: modula-ray
        import_path: modula_ray.serve.app:app_builder
        args: {runs: [/shared/runs/demo], ...}          # ServeArgs below: ours
        deployments:
          - name: CompositionServer                     # Serve's options: replicas, autoscaling,
            max_ongoing_requests: 48                    # max_ongoing_requests, ray_actor_options

``ServeArgs`` is validated here (a typed ``ConfigError`` names the field); the deployment
options go to ``CompositionServer.options(...)`` and Serve validates them. Secrets never need to
be in the file: ``admin_token`` falls back to ``MODULA_RAY_ADMIN_TOKEN`` and ``api_key`` to
``MODULA_RAY_API_KEY``, read where the application is built.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError

DEPLOYMENT = "CompositionServer"


class ServeArgs(BaseModel):
    """What the application serves and how it guards itself (all per replica)."""
    model_config = ConfigDict(extra="forbid")

    runs: list[str] = Field(default_factory=list)       # run folders; each served under its folder name
    base: list[str] = Field(default_factory=list)       # base models served alone, e.g. smollm2-135m
    admin_roots: list[str] = Field(default_factory=list)  # hot-plug may read run folders under these
    admin_token: str | None = None                      # else MODULA_RAY_ADMIN_TOKEN; none: admin is 404
    api_key: str | None = None                          # else MODULA_RAY_API_KEY; none: no key needed
    max_batch_size: int = Field(8, ge=1, le=256)        # rows decoded together (the running batch)
    prefill_tokens: int = Field(2048, ge=1)             # padded prompt tokens that join in one step
    fold_universal: bool = False                        # W0 + s* B* A* per composition: faster, a copy of W0
    max_queued_requests: int = Field(32, ge=0)          # waiting beyond a full batch: then 503
    request_timeout_s: float = Field(120.0, gt=0)       # a generation past this: 408
    max_body_bytes: int = Field(1 << 20, ge=1024)       # larger bodies: 413
    max_models_per_replica: int = Field(4, ge=1)        # serve.multiplexed LRU of compositions
    decode_hook: dict | None = None                     # tests only (hooks.py): called with each step's joiners

    @model_validator(mode="after")
    def _something_to_serve(self):
        if not self.runs and not self.base:
            raise ValueError("name at least one run folder (runs) or base model (base)")
        return self

    def resolved(self) -> ServeArgs:
        """Run folders made absolute, secrets filled from the environment."""
        return self.model_copy(update={
            "runs": [str(Path(r).resolve()) for r in self.runs],
            "admin_roots": [str(Path(r).resolve()) for r in self.admin_roots],
            "admin_token": self.admin_token or os.environ.get("MODULA_RAY_ADMIN_TOKEN") or None,
            "api_key": self.api_key or os.environ.get("MODULA_RAY_API_KEY") or None})

    def capacity(self) -> int:
        """Generation requests one replica holds at once: a running batch plus the queue."""
        return self.max_batch_size + self.max_queued_requests


def parse_args(args: dict, where: str = "args") -> ServeArgs:
    try:
        return ServeArgs(**(args or {}))
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{where}.{field}" if field else where, first["msg"]) from None


def deployment_options(args: ServeArgs, options: dict | None) -> dict:
    """Serve options for ``CompositionServer``, with ``max_ongoing_requests`` room for the
    replica's own queue (so overload is answered by us, with a JSON 503) plus health and admin calls."""
    options = dict(options or {})
    options.pop("name", None)
    ongoing = options.setdefault("max_ongoing_requests", args.capacity() + 8)
    if ongoing <= args.capacity():
        raise ConfigError("deployments.max_ongoing_requests",
                          f"{ongoing} must exceed max_batch_size + max_queued_requests ({args.capacity()}), "
                          f"or overload queues in Serve instead of being answered with 503")
    return options


def load_serve_config(path) -> tuple[dict, dict, dict]:
    """``(http_options, args, deployment options)`` of the first application in a Serve config."""
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError("serve config", str(error), source=str(path)) from None
    applications = document.get("applications") or []
    if len(applications) != 1 or not isinstance(applications[0], dict):
        raise ConfigError("applications", "expected exactly one application", source=str(path))
    app = applications[0]
    deployments = [d for d in app.get("deployments") or [] if d.get("name") == DEPLOYMENT]
    return dict(document.get("http_options") or {}), dict(app.get("args") or {}), (deployments or [{}])[0]
