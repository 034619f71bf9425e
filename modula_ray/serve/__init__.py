"""Serving composed models. ``generation`` (Ray-free) is the batched decoder the Serve deployment
will call; the Ray Serve app and the ``modula-ray serve`` command are not built yet."""
