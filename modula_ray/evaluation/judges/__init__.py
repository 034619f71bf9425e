"""Judge-prompt evaluators: a rubric (``eval/judges/<name>.yaml``) scored by any OpenAI-compatible
chat endpoint.

``client``  the HTTP client: retries with backoff, a concurrency limit, an on-disk cache.
``rubric``  loading a rubric, parsing verdicts (invalid ones counted), pointwise and pairwise judging.
``suite``   ``modula-ray eval RUN --suite judge``: answer the judged items, then judge them.
"""
