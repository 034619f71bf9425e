"""Ray Train: one file per stage, a shared per-worker loop, the concurrent launcher, the cost ledger.

``pipeline.run_pipeline`` runs the stages of a method (DESIGN §1); ``pipeline.add_domain``
plugs one more expert into an existing composition.
"""
