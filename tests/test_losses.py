"""Losses against direct numpy computations of the paper's formulas."""

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from conan.losses import cosent_loss, infonce_loss, matryoshka_loss


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_infonce_matches_eq1():
    q, p = _unit(4, 16, 0), _unit(12, 16, 1)  # 4 positives + 8 hard negatives
    pos = np.array([0, 1, 2, 3])
    tau = 0.05
    expected = np.mean([-(q[i] @ p[pos[i]] / tau) + np.log(np.exp(q[i] @ p.T / tau).sum()) for i in range(4)])
    loss, scores = infonce_loss(torch.tensor(q), torch.tensor(p), torch.tensor(pos), tau)
    assert abs(loss.item() - expected) < 1e-9
    np.testing.assert_allclose(scores.numpy(), q @ p.T, atol=1e-12)
    assert not scores.requires_grad


def test_cosent_matches_eq2():
    left, right = _unit(6, 8, 2), _unit(6, 8, 3)
    gold = np.array([0.0, 1.5, 3.0, 3.0, 4.2, 5.0])
    scale = 20.0
    cos = (left * right).sum(1)
    terms = [np.exp(scale * (cos[k] - cos[i]))
             for i, k in itertools.product(range(6), range(6)) if gold[i] > gold[k]]
    expected = np.log(1 + np.sum(terms))
    got, scores = cosent_loss(torch.tensor(left), torch.tensor(right), torch.tensor(gold), scale)
    assert abs(got.item() - expected) < 1e-9
    assert np.allclose(scores.numpy(), cos) and not scores.requires_grad  # the shared call shape: (loss, scores)


def test_cosent_is_log2_when_no_order_and_falls_when_ranking_right():
    x = torch.tensor(_unit(3, 4, 4))
    assert abs(cosent_loss(x, x, torch.ones(3))[0].item() - np.log(1.0)) < 1e-12  # no ordered pair → log(1)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b_good = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)  # pair 0 similar, pair 1 not
    good, _ = cosent_loss(a, b_good, torch.tensor([5.0, 0.0]))
    bad, _ = cosent_loss(a, b_good, torch.tensor([0.0, 5.0]))
    assert good.item() < 0.01 < bad.item()


def test_matryoshka_sums_task_loss_over_truncated_renormalised_dims():
    q, p = torch.tensor(np.random.default_rng(5).normal(size=(3, 32))), torch.tensor(
        np.random.default_rng(6).normal(size=(3, 32)))
    pos = torch.arange(3)
    total, per_dim = matryoshka_loss(infonce_loss, (q, p), [8, 16, 32], pos, temperature=0.1)
    expected = 0.0
    for d in (8, 16, 32):
        qd, pd = q[:, :d].numpy(), p[:, :d].numpy()
        qd, pd = qd / np.linalg.norm(qd, axis=1, keepdims=True), pd / np.linalg.norm(pd, axis=1, keepdims=True)
        s = qd @ pd.T / 0.1
        expected += np.mean([-s[i, i] + np.log(np.exp(s[i]).sum()) for i in range(3)])
    assert abs(total.item() - expected) < 1e-9
    assert sorted(per_dim) == [8, 16, 32]
