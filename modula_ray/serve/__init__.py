"""Serving composed models with Ray Serve (issue 8, in progress).

``generation``  Ray-free batched decoding over the full mixture (left padding, KV cache,
                per-request stopping and seeded sampling, routing weights).
``schemas``     OpenAI-shaped request and response bodies.
``app``         the Serve deployment with its FastAPI ingress; ``commands``: ``modula-ray serve``.

Not built yet: streaming, echo/logprobs, the admin hot-plug endpoint, API keys, overload (503)
and timeout (408) answers, multiplexing, ``cluster/serve.yaml`` and ``benchmarks/bench_serve.py``.
"""
