"""InfoNCE with in-batch and hard negatives (Conan-embedding-v2 eq. 1; Gutmann & Hyvärinen 2010).

    L = -(1/N) Σ_i log( exp(cos(x_i, y_i+)/τ) / Σ_j exp(cos(x_i, y_j)/τ) )

x_i are query embeddings; the candidates y_j are every passage of the (global) batch: each query's
positive, the other queries' positives and all hard negatives. The paper writes the sum without a
1/N and without τ; we average over queries and keep the usual temperature (τ = 1 recovers eq. 1's
logits).

A candidate that is another copy of query i's positive (the same paragraph answering another question,
the same question asked in another language, a repeated label) is not a negative of i: `candidates`
drops it from i's denominator (`positive_copies_mask`), as sentence-transformers' GISTEmbed and
CachedMNRL drop in-batch false negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_loss(queries: torch.Tensor, passages: torch.Tensor, positive_index: torch.Tensor,
                 temperature: float = 0.05, candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean InfoNCE of unit-norm `queries` (N, d) over unit-norm `passages` (M, d).

    positive_index[i] is the row of query i's positive in `passages`. Returns (loss, the cosine
    matrix (N, M) detached), so callers can read the scores of their negatives without another pass.
    `candidates` (N, M) bool, when given, limits each query's denominator to its True columns.
    """
    scores = queries @ passages.T
    logits = scores / temperature
    if candidates is not None:
        logits = logits.masked_fill(~candidates, float("-inf"))
    loss = F.cross_entropy(logits, positive_index)
    return loss, scores.detach()


def positive_copies_mask(candidate_keys: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """(N, M) bool for `infonce_loss(candidates=…)`: False where candidate j is another copy of query i's positive.

    candidate_keys (M,) identify each candidate's content (equal keys = the same passage: its id, or a hash of its
    text); query i's positive is column positive_index[i], which stays a candidate."""
    copies = candidate_keys[None, :] == candidate_keys[positive_index][:, None]
    copies[torch.arange(len(positive_index), device=copies.device), positive_index] = False
    return ~copies
