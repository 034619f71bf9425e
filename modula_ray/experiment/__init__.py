"""``modula-ray experiment paper``: the paper's comparison at small scale, on one Ray cluster.

``config``   the experiment file and each run's pipeline config (same data, same token budget)
``parts``    the plan: train, evaluate, tune the router, add a domain; what each part does
``runner``   the parts as concurrent Ray tasks, each run once (resumable)
``collect``  the parts' numbers per row and seed; ``report`` and ``figures``: report.md, PNGs, results.json

It sits beside the CLI: it drives train, tune and evaluation, so ``runner`` imports Ray and the
rest of the package does not.
"""
