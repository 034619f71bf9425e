"""``modula-ray serve RUN_DIR [RUN_DIR ...] [--base M] [--host H] [--port P] [--config serve.yaml]``.

Runs in the foreground on an in-process Ray (or the cluster ``RAY_ADDRESS`` names); Ctrl-C, or
the SIGTERM a process manager sends, shuts Serve and Ray down cleanly. ``--config`` reads a Serve config file (``cluster/serve.yaml``);
run folders, ``--base``, ``--host`` and ``--port`` given on the command line win over it.
"""
from __future__ import annotations

import signal
import time


def _stop(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    import ray
    from ray import serve

    from ..compose import Manifest
    from ..ray_session import connect_ray
    from .app import app_builder
    from .config import load_serve_config

    http, app_args, deployment = load_serve_config(args.config) if args.config else ({}, {}, {})
    app_args = {**app_args, **({"runs": args.runs} if args.runs else {}), **({"base": args.base} if args.base else {})}
    http = {"host": "127.0.0.1", "port": 8000, **http,
            **({"host": args.host} if args.host else {}), **({"port": args.port} if args.port else {})}
    app = app_builder({**app_args, "deployment": deployment})  # a typed ConfigError before Ray starts
    for run_dir in app_args.get("runs", []):
        Manifest.read(run_dir)  # and a clear ArtifactError
    owns_ray = connect_ray(log_to_driver=False)
    signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs its own SIGTERM handler
    signal.signal(signal.SIGINT, _stop)   # also when started in the background, where SIGINT is ignored
    try:  # Ctrl-C at any point, even while the replicas start, shuts Serve and Ray down cleanly
        serve.start(http_options=http)
        serve.run(app, name="modula-ray", route_prefix="/")
        served = [*app_args.get("runs", []), *app_args.get("base", [])]
        print(f"serving {served} on http://{http['host']}:{http['port']}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        if owns_ray:
            ray.shutdown()
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve finished runs on an OpenAI-compatible endpoint",
        description="Serve run folders (and base models alone) with Ray Serve: /v1/completions, "
                    "/v1/chat/completions (SSE streaming), /v1/models, /healthz, lm-eval's tokenizer endpoints "
                    "and POST /v1/admin/experts (hot-plug after add-domain; needs MODULA_RAY_ADMIN_TOKEN). "
                    "MODULA_RAY_API_KEY, if set, guards the inference endpoints.")
    parser.add_argument("runs", nargs="*", help="finished run folders; each is served under its folder name")
    parser.add_argument("--base", action="append", default=[], metavar="MODEL",
                        help="also serve a base model alone, e.g. smollm2-135m (repeatable)")
    parser.add_argument("--host", default=None, help="default: the config's, else 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: the config's, else 8000")
    parser.add_argument("--config", default=None, metavar="SERVE_YAML",
                        help="a Serve config file (see cluster/serve.yaml): replicas, autoscaling, limits")
    parser.set_defaults(func=cmd_serve)
    from .tour import add_parser as add_tour

    add_tour(commands)
