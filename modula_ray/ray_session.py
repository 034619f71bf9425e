"""The one Ray set-up of every entry point: the CLI and jobs/, training, Tune, the experiment, serve
and chat-tour.

``OFFLINE_ENV`` / ``use_offline_env()``
    The environment every process of ours runs in: no model hub (DESIGN §4), tokenizers without
    their fork-unsafe thread pool. The CLI sets it first thing; Ray Train workers get it as their
    ``runtime_env`` (``train.launcher.worker_env``); an experiment part sets it in its Ray task.

``connect_ray(run_dir, num_cpus=..., log_to_driver=...)``
    Inside ``ray job submit`` RAY_ADDRESS is the GCS address and we join it. Beside a cluster,
    after ``eval "$(cluster/local.sh env)"``, RAY_ADDRESS is the dashboard's ``http://`` address
    (what ``ray job submit`` wants) and ``ray.init`` cannot use it: we join the GCS address in
    ``MODULA_RAY_GCS_ADDRESS``, else ``auto`` (a head node started with the default temp dir),
    and check that the cluster we joined serves that dashboard. No RAY_ADDRESS: an in-process Ray
    with ``num_cpus`` logical CPUs (default: the cores).

With a run folder, Ray's own logging, Python warnings and every worker's output go to
``RUN_DIR/logs/`` (``log_to_driver=False``); the terminal keeps our progress lines, which the
launcher reads back from the rank-0 worker log (see ``train.launcher.ProgressTail``). Without
one, Ray logs warnings and errors only; our own ``ray: ...`` line says where Ray runs.

This module sits below train/, tune/ and serve/ (serve never imports train, DESIGN §3), so that
they all share it; it imports Ray only inside its functions.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from .errors import ModulaError

GCS_ENV = "MODULA_RAY_GCS_ADDRESS"
QUIET_LOGGERS = ("ray", "DeepSpeed", "py.warnings")
# Not a job-level ``runtime_env`` of ``ray.init``: under `ray job submit --runtime-env
# cluster/runtime_env.yaml`, which sets the same keys, Ray refuses to merge the two.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class ClusterAddressError(ModulaError, RuntimeError):
    """RAY_ADDRESS names a cluster this command cannot join; the message says what to do."""


def use_offline_env() -> None:
    """``OFFLINE_ENV`` in this process, where the caller has not set a value. Call it before
    ``transformers`` is imported: ``huggingface_hub`` reads HF_HUB_OFFLINE once, on import."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def logs_dir(run_dir) -> Path:
    path = Path(run_dir) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def send_ray_logs_to(run_dir) -> Path:
    """Ray's, DeepSpeed's and Python's warnings and info lines -> ``RUN_DIR/logs/driver.log``;
    only errors stay on the terminal."""
    path = logs_dir(run_dir) / "driver.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        for existing in logger.handlers:
            if isinstance(existing, logging.StreamHandler) and not isinstance(existing, logging.FileHandler):
                existing.setLevel(logging.ERROR)
        if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
            logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    return path


def route_raylet_messages() -> None:
    """Send the raylet's messages to driver.log; keep only the non-warnings, such as a dead
    worker's error, on the terminal.

    Ray 2.60 has no public way to do this, so we replace a private function. The driver's
    ``listen_error_messages`` thread (``ray/_private/worker.py``) prints every raylet message,
    e.g. "WARNING: 12 PYTHON worker processes have been started", with ``print_to_stdstream``
    straight to stdout. ``log_to_driver=False`` and RAY_LOG_TO_DRIVER only stop the workers'
    output. ``logging_config`` only formats Python loggers, and these lines do not pass through
    one. Ray's issues #9384, #12223 and #63800 ask for a switch, and none exists yet. If the
    function moves, we find it missing and leave Ray alone."""
    from ray._private import worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "routed_by_modula_ray", False):
        return
    logger = logging.getLogger("ray")

    def route(data, ignore_prefix):
        lines = list(data.get("lines", []))
        for line in lines:
            logger.info("(%s) %s", data.get("pid"), line)
        errors = [line for line in lines if not line.lstrip().startswith("WARNING")]
        if errors:
            original({**data, "lines": errors}, ignore_prefix)

    route.routed_by_modula_ray = True
    ray_worker.print_to_stdstream = route


def _dashboard(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    host = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1"}.get(parsed.hostname or "", parsed.hostname or "")
    return f"{host}:{parsed.port or 8265}"


def _join(address: str | None, dashboard_url: str | None, **options):
    import ray

    saved = os.environ.pop("RAY_ADDRESS", None) if dashboard_url else None  # ray.init would read it again
    try:
        context = ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if dashboard_url is None:
            raise
        raise ClusterAddressError(
            f"RAY_ADDRESS={dashboard_url} is the dashboard address that `ray job submit` uses, and no GCS "
            f"address for that cluster was found ({address}: {str(exc).splitlines()[0]}); set {GCS_ENV}=HOST:PORT "
            f"(the head's GCS port, 6379 by default; `cluster/local.sh env` sets it), submit the command as a job "
            f"with `ray job submit --working-dir . -- python jobs/...`, or `unset RAY_ADDRESS` to train "
            f"in-process.") from None
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    # A cluster without a dashboard is not the one RAY_ADDRESS names either ("auto" joins any Ray
    # running on this machine, found by its process, when no address file names one).
    if dashboard_url is not None and _dashboard(context.dashboard_url or "") != _dashboard(dashboard_url):
        ray.shutdown()
        joined = f"the cluster whose dashboard is {context.dashboard_url}" if context.dashboard_url else \
            "a cluster without a dashboard"
        raise ClusterAddressError(f"{address} joined {joined}, not RAY_ADDRESS={dashboard_url}; set {GCS_ENV} to "
                                  f"that cluster's GCS address.")
    return context


def connect_ray(run_dir=None, *, num_cpus: float | None = None, log_to_driver: bool | None = None) -> bool:
    """Join the cluster of ``ray job submit`` or the one RAY_ADDRESS names, or start an in-process
    Ray (``num_cpus`` logical CPUs; ignored on a cluster). ``log_to_driver`` defaults to "no run
    folder". True if this call started or joined Ray, so the caller owns it and shuts it down;
    False if Ray was already up."""
    import ray

    use_offline_env()  # before ray.init: an in-process Ray's workers inherit this environment
    if run_dir is not None:
        send_ray_logs_to(run_dir)
        route_raylet_messages()
    if ray.is_initialized():
        return False
    options = {"log_to_driver": run_dir is None if log_to_driver is None else log_to_driver,
               "logging_level": logging.INFO if run_dir is not None else logging.WARNING}
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        context = _join(os.environ.get(GCS_ENV) or "auto", dashboard_url=address, **options)
    elif address:
        context = _join(address, dashboard_url=None, **options)
    else:
        # One machine has no node that a cloud can drain, so Train's preemption watcher (one more
        # actor per fit) has nothing to watch; a cluster keeps it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        context = _join(None, dashboard_url=None, num_cpus=num_cpus, **options)
    cpus = f" with {num_cpus:g} logical CPUs on {os.cpu_count()} cores" if num_cpus and not address else ""
    where = f"joined the cluster at {address}" if address else f"started an in-process Ray{cpus}"
    dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    logs = f"; Ray's output goes to {logs_dir(run_dir).resolve()}" if run_dir is not None else ""
    print(f"ray: {where}{dashboard}{logs}", flush=True)
    return True
