"""The held-out loss intervals (experiment.intervals): ratios of sums, seeds pooled per item, paired
differences, and a 95% interval that covers the true ratio about 95% of the time."""
import numpy as np
import pytest

from modula_ray.experiment.intervals import Bootstrap, Items, pool_seeds, seed_losses


def heldout(nll, nbytes, domain="math"):
    return {"domains": {domain: {"ids": [f"{domain}-{i}" for i in range(len(nll))], "nll": list(nll),
                                 "bytes": list(nbytes)}}}


def test_the_loss_is_a_ratio_of_sums_and_seeds_are_averaged_per_item():
    pooled = pool_seeds([heldout([1.0, 3.0], [2, 4]), heldout([3.0, 5.0], [2, 4])])["math"]
    assert pooled.seeds == 2 and pooled.nll.tolist() == [2.0, 4.0]
    interval = Bootstrap(500).loss({"math": pooled}, ["math"])
    assert interval.value == pytest.approx(6.0 / 6.0)
    assert interval.low <= interval.value <= interval.high
    assert seed_losses([heldout([1.0, 3.0], [2, 4]), heldout([3.0, 5.0], [2, 4])], ["math"]) == [4 / 6, 8 / 6]


def test_seeds_with_other_items_are_refused():
    with pytest.raises(ValueError, match="differ between seeds"):
        pool_seeds([heldout([1.0, 2.0], [2, 2]), heldout([1.0], [2])])


def test_a_paired_difference_resolves_a_shift_that_unpaired_intervals_do_not():
    """Items vary 10x more than the effect: the two rows' own intervals overlap, the paired one excludes 0."""
    rng = np.random.default_rng(1)
    nbytes = rng.integers(50, 200, size=128).astype(float)
    hardness = rng.lognormal(0.0, 0.6, size=128)
    a = hardness * nbytes
    b = (hardness + 0.05 + rng.normal(0, 0.01, size=128)) * nbytes
    ids = tuple(range(128))
    rows = {"a": {"d": Items(ids, a, nbytes, 1)}, "b": {"d": Items(ids, b, nbytes, 1)}}
    boot = Bootstrap(2000, seed=0)
    la, lb = boot.loss(rows["a"], ["d"]), boot.loss(rows["b"], ["d"])
    assert la.high > lb.low  # unpaired: overlapping
    diff = boot.difference(rows["a"], rows["b"], ["d"])
    assert diff.value == pytest.approx(la.value - lb.value)
    assert diff.high < 0 and diff.verdict() == "lower"
    assert boot.difference(rows["a"], rows["a"], ["d"]).verdict() == "within noise"


def test_different_items_cannot_be_paired():
    rows = [{"d": Items(ids, np.ones(2), np.ones(2), 1)} for ids in ((0, 1), (0, 2))]
    with pytest.raises(ValueError, match="different 'd' items"):
        Bootstrap(100).difference(rows[0], rows[1], ["d"])


def test_the_95_percent_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    true_ratio, covered, trials = 2.0, 0, 200
    for trial in range(trials):
        nbytes = rng.integers(20, 300, size=128).astype(float)
        nll = nbytes * true_ratio * rng.gamma(4.0, 0.25, size=128)  # mean ratio 2.0 per item
        interval = Bootstrap(400, seed=trial).loss({"d": Items(tuple(range(128)), nll, nbytes, 1)}, ["d"])
        covered += interval.low <= true_ratio <= interval.high
    assert 0.88 <= covered / trials <= 0.99
