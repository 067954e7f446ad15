"""Whether a stage learns: the chance warning and the unigram entropy."""

import math

import numpy as np

from conan.train.diagnostics import chance_warning, unigram_entropy
from conan.train.loop import progress_line


def test_chance_warning_waits_a_fifth_of_the_steps_and_names_the_stage():
    assert chance_warning("weak", 10, 100, 0.95) is None  # too early to tell
    assert chance_warning("weak", 30, 100, 0.85) is None  # learning
    warning = chance_warning("weak", 30, 100, 0.95)
    assert warning.startswith("[weak] WARNING: step 30/100") and "0.95 · log N" in warning


def test_unigram_entropy_is_the_frequency_predictors_loss():
    assert unigram_entropy(np.array([5, 5, 0, 5, 5])) == math.log(4)
    assert unigram_entropy(np.array([7, 0, 0])) == 0.0


def test_progress_line_shows_what_tells_learning_from_not():
    from conan.config import JobConfig, load_config

    cfg = load_config(JobConfig, None, ["stage=weak", "train.steps=100"])
    line = progress_line(cfg, {"step": 40, "loss": 3.9, "lr": 1e-4, "samples_per_s": 50.0, "positive_cos": 0.9,
                               "negative_cos": 0.88, "random_pair_cos": 0.93, "log_candidates": 4.16,
                               "chance_ratio": 0.94, "step_time_s": 2.5})
    assert line.startswith("[weak] step 40/100 loss 3.900 cos pos/neg/random 0.90/0.88/0.93 logN 4.16")
    assert "50 samples/s ETA 2m30s" in line  # 60 steps left at 2.5 s
    assert "\n[weak] WARNING: step 40/100" in line
    pretrain = load_config(JobConfig, None, ["stage=pretrain", "train.steps=100"])
    assert "(unigram entropy 6.920)" in progress_line(pretrain, {"step": 40, "loss": 6.8, "lr": 1e-4,
                                                                 "samples_per_s": 5.0, "unigram_entropy": 6.92})
