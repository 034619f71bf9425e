"""Evaluation of finished compositions. Ray-free, so a Tune trial can call it in-process.

``routing``  the mean gate per routed expert on each domain's prompts (``modula-ray eval RUN --suite routing``).
"""
