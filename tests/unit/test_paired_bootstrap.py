"""The evaluation's paired bootstrap: the difference it reports is the report's, and its interval is honest."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from conan.eval.metrics import paired_bootstrap, resampled_main_metric


def test_the_sts_metric_of_a_resample_is_spearmans_with_ties():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 6, 300).astype(float)  # STS gold scores repeat: ties
    cosine = gold / 5 + rng.normal(0, 0.5, 300)
    items = np.stack([cosine, gold], axis=1)
    picks = rng.integers(0, 300, (4, 300))
    expected = [spearmanr(cosine[p], gold[p]).statistic for p in picks]
    assert resampled_main_metric("sts", items, picks) == pytest.approx(expected, abs=1e-12)
    assert resampled_main_metric("retrieval", cosine, picks) == pytest.approx(cosine[picks].mean(axis=1))


def test_the_difference_is_the_mean_over_subsets_and_a_clear_gain_is_better():
    rng = np.random.default_rng(1)
    theirs = [rng.uniform(0, 1, 150), rng.uniform(0, 1, 80)]
    ours = [np.clip(t + 0.1, 0, 1) for t in theirs]
    d = paired_bootstrap("retrieval", ours, theirs)
    assert d["delta"] == pytest.approx(np.mean([(o - t).mean() for o, t in zip(ours, theirs)]))
    assert 0 < d["low"] < d["delta"] < d["high"]
    assert paired_bootstrap("retrieval", theirs, theirs) == {"delta": 0.0, "low": 0.0, "high": 0.0}
    worse = paired_bootstrap("retrieval", theirs, ours)
    assert worse["high"] < 0 and worse["delta"] == pytest.approx(-d["delta"])


def test_two_unrelated_sts_models_differ_within_noise():
    """Two models whose cosines are unrelated noise on the same 500 gold pairs: Spearman ~0 each, the difference's
    interval holds 0 and is as wide as two independent correlations of 500 pairs allow (sd ~ sqrt(2 / 500))."""
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 6, 500).astype(float)
    a, b = (np.stack([rng.normal(size=500), gold], axis=1) for _ in range(2))
    d = paired_bootstrap("sts", [a], [b])
    assert d["low"] < 0 < d["high"]
    assert 0.15 < d["high"] - d["low"] < 0.35  # 2 × 1.96 × 0.063 = 0.25


def test_the_interval_misses_a_zero_difference_about_one_time_in_twenty():
    """200 comparisons of two models with the same hit rate: the 95 % interval excludes 0 in about 5 % of them."""
    rng = np.random.default_rng(3)
    excluded = 0
    for trial in range(200):
        ours, theirs = rng.random(120) < 0.5, rng.random(120) < 0.5
        d = paired_bootstrap("bitext", [ours], [theirs], resamples=500, seed=trial)
        excluded += d["low"] > 0 or d["high"] < 0
    assert 2 <= excluded <= 20  # 10 expected; 2 and 20 are ~2.6 sd away
