"""Evaluation of finished compositions. Ray-free, so a Tune trial can call it in-process.

``lm``         the lm-eval model ``modula`` (``HFLM`` over ``load_composition`` or a base model);
               ``lm_eval_hook`` makes a plain ``lm_eval`` command line find it.
``tasks``      data loading and scorers for the task YAMLs in ``eval/tasks/``.
``run``        the lm-eval suites (domain, general) over a composition and its base model.
``sandbox``    untrusted code (HumanEval) in a limited subprocess.
``judges/``    judge-prompt evaluators over any OpenAI-compatible endpoint.
``routing``    the routing table, routing accuracy and per-layer gates.
``report``     ``RUN/eval/results.json`` and the paper-style ``report.md``; ``commands``: ``modula-ray eval``.
"""
