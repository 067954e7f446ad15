"""CoSENT loss for STS pairs (Conan-embedding-v2 eq. 2; Su 2022).

    L = log(1 + Σ_{sim(i,j) > sim(k,l)} exp((cos(x_k, x_l) - cos(x_i, x_j)) · λ))

over every ordered pair of sentence pairs whose gold similarities differ, with λ = 1/τ the scale
(20 in the reference implementation). It only asks that predicted cosines rank like gold scores.
"""

from __future__ import annotations

import torch


def cosent_loss(left: torch.Tensor, right: torch.Tensor, gold: torch.Tensor,
                scale: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """CoSENT of unit-norm pair embeddings `left`, `right` (N, d) against gold scores (N,).

    Returns (loss, the pairs' cosines (N,) detached): the call shape of every loss here."""
    cos = (left * right).sum(-1)
    logits = cos * scale
    diff = logits[None, :] - logits[:, None]  # diff[a, b] = cos_b - cos_a, scaled
    higher = gold[:, None] > gold[None, :]  # pair a should score above pair b
    diff = diff.masked_fill(~higher, float("-inf"))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0), cos.detach()
