"""Ray Tune over the router (stage 3) of a finished run: ``space.py`` (the search as data),
``trainable.py`` (a Tune function trainable -> the stage-3 TorchTrainer), ``search.py`` (the
Tuner, restore, trials.csv), ``install.py`` (the best router into the run), ``report.py``."""
