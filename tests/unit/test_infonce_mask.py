"""The positive-copies mask: another copy of a query's positive is no negative of that query."""

import numpy as np
import torch

from conan.losses import infonce_loss, positive_copies_mask
from conan.train.diagnostics import contrastive_stats


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_masked_infonce_equals_a_hand_computation():
    """Queries 0 and 2 share a positive text (keys 7): each one's copy leaves the other's denominator; query 1's
    hard negative (column 4) is another copy of its own positive and leaves it too."""
    q, p = _unit(3, 8, 0), _unit(6, 8, 1)
    keys = torch.tensor([7, 5, 7, 9, 5, 3])
    target = torch.tensor([0, 1, 2])
    allowed = positive_copies_mask(keys, target)
    expected_allowed = np.array([[1, 1, 0, 1, 1, 1],
                                 [1, 1, 1, 1, 0, 1],
                                 [0, 1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(allowed.numpy(), expected_allowed)
    tau = 0.05
    s = q @ p.T / tau
    expected = np.mean([-s[i, target[i]] + np.log(np.exp(s[i][expected_allowed[i]]).sum()) for i in range(3)])
    loss, _ = infonce_loss(torch.tensor(q), torch.tensor(p), target, tau, allowed)
    assert abs(loss.item() - expected) < 1e-9
    unmasked, _ = infonce_loss(torch.tensor(q), torch.tensor(p), target, tau)
    assert loss.item() < unmasked.item()


def test_mask_without_copies_changes_nothing():
    q, p = torch.tensor(_unit(4, 8, 2)), torch.tensor(_unit(4, 8, 3))
    target = torch.arange(4)
    allowed = positive_copies_mask(torch.tensor([1, 2, 3, 4]), target)
    assert allowed.all()
    assert infonce_loss(q, p, target, 0.05, allowed)[0].item() == infonce_loss(q, p, target, 0.05)[0].item()


def test_contrastive_stats_read_the_score_matrix():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, -0.1]])
    allowed = torch.tensor([[True, True, False], [True, True, True]])
    positives = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    stats = contrastive_stats(scores, torch.tensor([0, 1]), allowed, positives, torch.tensor([[0.1], [-0.1]]))
    assert stats["positive_cos"] == np.float32((0.9 + 0.8) / 2)
    assert abs(stats["negative_cos"] - (0.1 + 0.2 - 0.1) / 3) < 1e-7  # the masked 0.3 is no candidate
    assert abs(stats["random_pair_cos"] - 0.6) < 1e-6
    assert abs(stats["log_candidates"] - (np.log(2) + np.log(3)) / 2) < 1e-12
    assert abs(stats["hard_negative_cos"]) < 1e-7
