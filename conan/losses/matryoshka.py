"""Matryoshka representation loss (Kusupati et al. 2022), as used by Conan-embedding-v2 §4.2.

    L_MRL = Σ_{d ∈ dims} L_task(normalize(x[:, :d]), normalize(y[:, :d]))

The task loss is applied to the first d coordinates of every embedding, renormalised, for each
configured dim (256 … 3584 on conan-1.4b), so any prefix is a usable embedding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from conan.model.pooling import matryoshka_truncate


def matryoshka_loss(loss_fn: Callable[..., torch.Tensor], embeddings: Sequence[torch.Tensor],
                    dims: Sequence[int], *args, **kwargs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Sum of loss_fn over dims; `embeddings` are raw (unnormalised) pooled vectors passed first.

    loss_fn gets the truncated, renormalised embeddings followed by *args/**kwargs and returns a
    scalar or a (scalar, extra) tuple. Returns (total, {dim: that dim's loss or tuple}).
    """
    per_dim = {}
    total = None
    for dim in dims:
        out = loss_fn(*(matryoshka_truncate(e, dim) for e in embeddings), *args, **kwargs)
        per_dim[dim] = out
        value = out[0] if isinstance(out, tuple) else out
        total = value if total is None else total + value
    return total, per_dim
