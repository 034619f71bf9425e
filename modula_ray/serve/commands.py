"""``modula-ray serve RUN_DIR [RUN_DIR ...] [--host 127.0.0.1] [--port 8000]``: in the foreground."""
from __future__ import annotations

import time


def cmd_serve(args) -> int:
    import ray
    from ray import serve

    from ..compose import read_manifest
    from .app import build_app

    for run_dir in args.runs:
        read_manifest(run_dir)  # a clear ArtifactError before Ray starts
    if not args.runs and not args.base:
        raise SystemExit("serve: name at least one RUN_DIR or --base MODEL")
    ray.init(address=None, log_to_driver=False, ignore_reinit_error=True)
    try:  # Ctrl-C at any point, even while the replicas start, shuts Serve and Ray down cleanly
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args.runs, base_models=args.base), name="modula-ray", route_prefix="/")
        print(f"serving {[*args.runs, *args.base]} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("serve", help="serve finished runs on an OpenAI-compatible endpoint",
                                 description="Serve run folders (and base models) with Ray Serve: "
                                             "/v1/completions, /v1/chat/completions, /v1/models, /healthz.")
    parser.add_argument("runs", nargs="*", help="finished run folders; each is served under its folder name")
    parser.add_argument("--base", action="append", default=[], metavar="MODEL",
                        help="also serve a base model alone, e.g. smollm2-135m (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.set_defaults(func=cmd_serve)
