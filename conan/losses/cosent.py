"""CoSENT loss for STS pairs (Conan-embedding-v2 eq. 2; Su 2022).

    L = log(1 + Σ_{sim(i,j) > sim(k,l)} exp((cos(x_k, x_l) - cos(x_i, x_j)) · λ))

over every ordered pair of sentence pairs whose gold similarities differ, with λ = 1/τ the scale
(20 in the reference implementation). It only asks that predicted cosines rank like gold scores.
"""

from __future__ import annotations

import torch


def cosent_loss(left: torch.Tensor, right: torch.Tensor, gold: torch.Tensor,
                scale: float = 20.0) -> torch.Tensor:
    """CoSENT of unit-norm pair embeddings `left`, `right` (N, d) against gold scores (N,)."""
    cos = (left * right).sum(-1) * scale
    diff = cos[None, :] - cos[:, None]  # diff[a, b] = cos_b - cos_a
    higher = gold[:, None] > gold[None, :]  # pair a should score above pair b
    diff = diff.masked_fill(~higher, float("-inf"))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)
