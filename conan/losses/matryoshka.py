"""Matryoshka representation loss (Kusupati et al. 2022), as used by Conan-embedding-v2 §4.2.

    L_MRL = Σ_{d ∈ dims} L_task(normalize(x[:, :d]), normalize(y[:, :d]))

The task loss is applied to the first d coordinates of every embedding, renormalised, for each
configured dim (256 … 3584 on conan-1.4b), so any prefix is a usable embedding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from conan.model.pooling import matryoshka_truncate


LossOutput = tuple[torch.Tensor, torch.Tensor]  # (loss, detached scores)


def matryoshka_loss(loss_fn: Callable[..., LossOutput], embeddings: Sequence[torch.Tensor], dims: Sequence[int],
                    *args, **kwargs) -> tuple[torch.Tensor, dict[int, LossOutput]]:
    """Sum of loss_fn over dims; `embeddings` are raw (unnormalised) pooled vectors passed first.

    loss_fn has the call shape of every loss in conan.losses: the truncated, renormalised embeddings, then
    *args/**kwargs; it returns (loss, detached scores). Returns (total, {dim: (that dim's loss, its scores)}).
    """
    per_dim = {dim: loss_fn(*(matryoshka_truncate(e, dim) for e in embeddings), *args, **kwargs) for dim in dims}
    return sum(loss for loss, _ in per_dim.values()), per_dim
