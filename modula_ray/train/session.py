"""The driver's Ray session: which cluster to join, and where Ray's own output goes.

``connect_ray(run_dir)``
    Inside ``ray job submit`` RAY_ADDRESS is the GCS address and we join it. Beside a cluster,
    after ``eval "$(cluster/local.sh env)"``, RAY_ADDRESS is the dashboard's ``http://`` address
    (what ``ray job submit`` wants) and ``ray.init`` cannot use it: we join the GCS address in
    ``MODULA_RAY_GCS_ADDRESS``, else ``auto`` (a head node started with the default temp dir),
    and check that the cluster we joined serves that dashboard. No RAY_ADDRESS: an in-process Ray.

Ray's own logging (driver side), Python warnings and every worker's output go to
``RUN_DIR/logs/`` (``log_to_driver=False``); the terminal keeps our progress lines, which the
launcher reads back from the rank-0 worker log (see ``launcher.ProgressTail``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ModulaError

GCS_ENV = "MODULA_RAY_GCS_ADDRESS"
QUIET_LOGGERS = ("ray", "DeepSpeed", "py.warnings")


class ClusterAddressError(ModulaError, RuntimeError):
    """RAY_ADDRESS names a cluster this command cannot join; the message says what to do."""


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
    """Ray's driver prints the raylet's messages (e.g. "WARNING: 12 PYTHON worker processes have been
    started") straight to stdout even with ``log_to_driver=False`` (``listen_error_messages`` in
    ``ray/_private/worker.py`` calls ``print_to_stdstream``). Send every one to driver.log and keep
    only the non-warnings, such as a dead worker's error, on the terminal."""
    from ray._private import worker as ray_worker  # private API: checked, and left alone if it moved

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


def _join(address: str, log_to_driver: bool, dashboard_url: str | None):
    import ray

    saved = os.environ.pop("RAY_ADDRESS", None) if dashboard_url else None  # ray.init would read it again
    try:
        context = ray.init(address=address, log_to_driver=log_to_driver)
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
    if dashboard_url is not None and context.dashboard_url and _dashboard(context.dashboard_url) != _dashboard(
            dashboard_url):
        ray.shutdown()
        raise ClusterAddressError(f"{address} joined the cluster whose dashboard is {context.dashboard_url}, not "
                                  f"RAY_ADDRESS={dashboard_url}; set {GCS_ENV} to that cluster's GCS address.")
    return context


def connect_ray(run_dir=None) -> None:
    """Join the cluster of ``ray job submit`` or the one RAY_ADDRESS names, or start an in-process Ray."""
    import ray

    if run_dir is not None:
        send_ray_logs_to(run_dir)
        route_raylet_messages()
    if ray.is_initialized():
        return
    log_to_driver = run_dir is None
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        context = _join(os.environ.get(GCS_ENV) or "auto", log_to_driver, dashboard_url=address)
    else:
        context = _join(address, log_to_driver, dashboard_url=None)
    where = f"joined the cluster at {address}" if address else "started an in-process Ray"
    dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    logs = f"; Ray's output goes to {logs_dir(run_dir).resolve()}" if run_dir is not None else ""
    print(f"ray: {where}{dashboard}{logs}", flush=True)
