"""Sentence embeddings from token states: mean or last-token pooling and Matryoshka truncation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states of non-padding tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last non-padding token of each right-padded sequence."""
    last = attention_mask.long().sum(1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool token states into one vector per sequence ('mean' or 'last')."""
    if method == "mean":
        return mean_pool(hidden, attention_mask)
    if method == "last":
        return last_token_pool(hidden, attention_mask)
    raise ValueError(f"unknown pooling {method!r}; expected 'mean' or 'last'")


def pool_packed(hidden: torch.Tensor, documents: torch.Tensor, method: str) -> torch.Tensor:
    """Pool the token states (length, hidden) of a packed row into one vector per document ('mean' or 'last')."""
    sizes = torch.bincount(documents)
    if method == "mean":
        sums = torch.zeros(len(sizes), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        return sums.index_add_(0, documents, hidden) / sizes[:, None].to(hidden.dtype)
    if method == "last":
        return hidden[sizes.cumsum(0) - 1]
    raise ValueError(f"unknown pooling {method!r}; expected 'mean' or 'last'")


def matryoshka_truncate(embeddings: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Keep the first `dim` coordinates (all when None) and renormalise to unit L2 norm."""
    if dim is not None:
        if not 0 < dim <= embeddings.shape[-1]:
            raise ValueError(f"Matryoshka dim {dim} is outside (0, {embeddings.shape[-1]}]")
        embeddings = embeddings[..., :dim]
    return F.normalize(embeddings, p=2, dim=-1)
