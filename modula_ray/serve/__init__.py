"""Serving composed models with Ray Serve on an OpenAI-compatible endpoint.

``generation``  Ray-free batched decoding over the full mixture, step by step (left padding, KV
                cache, per-request stopping, seeded sampling, logprobs, routing weights).
``schemas``     OpenAI-shaped request and response bodies (and our extension, ``routing``).
``responses``   results in those shapes: usage, logprobs, server-sent events.
``config``      ``ServeArgs`` and the Serve config file (``cluster/serve.yaml``).
``hotplug``     what a loaded composition is, and which folders a hot-plug may read.
``app``         the Serve deployment with its FastAPI ingress; ``commands``: ``modula-ray serve``.
"""
