"""``modula-ray chat-tour RUN_DIR``: serve a finished run, ask it one question per domain through
the ``openai`` client, print each answer with its routing weights, and shut down (``make demo``).

The questions are the first test prompts of each domain of the run (never trained on). The
endpoint is the product's: Ray Serve on 127.0.0.1 (an in-process Ray, or the cluster
``RAY_ADDRESS`` names), ``/v1/chat/completions`` with our ``routing`` extension.
"""
from __future__ import annotations

import logging
import socket
import textwrap
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def domain_questions(run_dir) -> list[tuple[str, str]]:
    """``(domain, prompt)``: the first test prompt of each domain of the composition."""
    from ..compose import Manifest
    from ..data.build import split_file
    from ..data.schema import read_split

    manifest = Manifest.read(run_dir)
    return [(domain, read_split(split_file(manifest["data"]["dir"], domain, "test")).column("prompt")[0].as_py())
            for domain in manifest["domains"]]


def routing_line(weights: dict[str, float] | None) -> str:
    if not weights:
        return "routing: (this composition has no router)"
    ranked = sorted(weights.items(), key=lambda kv: -kv[1])
    return "routing: " + "  ".join(f"{name} {value:.2f}" for name, value in ranked)


def cmd_chat_tour(args) -> int:
    import openai
    import ray
    from ray import serve

    from ..compose import Manifest
    from ..ray_session import connect_ray
    from .app import build_app

    Manifest.read(args.run)  # a clear ArtifactError before Ray starts
    questions = domain_questions(args.run)
    name = args.run.rstrip("/").split("/")[-1]
    port = args.port or free_port()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines would bury the answers
    owns_ray = connect_ray(log_to_driver=False)
    try:
        started = time.time()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app([args.run]), name="modula-ray-tour", route_prefix="/")
        print(f"serving {name} on http://127.0.0.1:{port}/v1 (ready in {time.time() - started:.0f} s); "
              f"one question per domain through the openai client:\n", flush=True)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300, max_retries=0)
        for domain, prompt in questions:
            started = time.time()
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=0, extra_body={"routing": True})
            seconds = time.time() - started
            answer = reply.choices[0].message.content.strip()
            print(f"[{domain}] {textwrap.shorten(prompt, 110)}")
            print(textwrap.indent(textwrap.fill(answer or "(empty)", 100), "  answer: ", lambda line: True)
                  .replace("\n  answer: ", "\n          "))
            print(f"  {routing_line((reply.model_extra or {}).get('routing'))}  "
                  f"({reply.usage.completion_tokens} tokens in {seconds:.1f} s)\n", flush=True)
    finally:
        serve.delete("modula-ray-tour")
        if owns_ray:
            serve.shutdown()
            ray.shutdown()
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "chat-tour", help="serve a run and ask it one question per domain (openai client), with routing",
        description="Start the Serve endpoint for RUN_DIR on 127.0.0.1, send the first test prompt of each of "
                    "its domains through the openai client with routing weights requested, print each answer "
                    "and the mean gate per expert, then shut Serve down.")
    parser.add_argument("run", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--max-tokens", type=int, default=48, help="per answer (default: 48)")
    parser.set_defaults(func=cmd_chat_tour)
