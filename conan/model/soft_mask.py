"""Soft mask: a scheduled transition from causal to bidirectional attention (paper §3.2, App. C).

The paper defines a mask matrix (eq. 4), with 1-indexed query position i, key position j and
l the training sequence length:

    M_ij(t) = 1                          if i >= j   (the causal lower triangle)
    M_ij(t) = min(alpha(t) * l / i, 1)   if i <  j   (the upper triangle, opened over time)

and three schedules alpha(t) over the stage's tau total steps (App. C):
linear t/tau, accelerating (t/tau)^2, decelerating 1 - (1 - t/tau)^2.

Reading: the paper says the mask *weights* attention, so we apply it multiplicatively to the
unnormalised attention probabilities, i.e. as the additive bias log(M) on the attention logits:
softmax(s + log M) ∝ M * exp(s). M = 0 gives -inf (masked, so t = 0 is exactly causal) and M = 1
gives 0 (unmasked, so t = tau is exactly bidirectional, because l / i >= 1 for every row i).
Rows i with small i reach 1 first (l / i is largest there), which the paper calls the
rank-reduction term; `rank_reduction=False` drops it (M_ij = alpha for i < j), the ablation
variant the mask sweep compares against.

l is the padded length of the batch (the tensor's sequence dimension), so one bias serves every
sequence and head in the batch; padded keys are masked separately by the caller. A packed row (texts back to
back, unpadded) takes l = its longest text, the length the same texts padded into a batch would have.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import torch

Schedule = Literal["linear", "accelerating", "decelerating"]
SCHEDULES: tuple[str, ...] = ("linear", "accelerating", "decelerating")


def soft_mask_alpha(step: int, total_steps: int, schedule: Schedule = "linear") -> float:
    """alpha(t) of App. C for step t of tau total steps, clamped to [0, 1]."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    x = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return x
    if schedule == "accelerating":
        return x * x
    if schedule == "decelerating":
        return 1.0 - (1.0 - x) ** 2
    raise ValueError(f"unknown soft-mask schedule {schedule!r}; expected one of {SCHEDULES}")


def soft_mask_matrix(length: int, alpha: float, rank_reduction: bool = True,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """M(t) of eq. 4 as an (l, l) tensor, rows = query positions, columns = key positions."""
    pos = torch.arange(1, length + 1, device=device, dtype=torch.float64)
    i, j = pos[:, None], pos[None, :]
    upper = (alpha * length / i).clamp(max=1.0) if rank_reduction else torch.full_like(i, alpha)
    return torch.where(i >= j, torch.ones((), dtype=torch.float64, device=device),
                       upper.expand(length, length)).to(dtype)


def is_fully_open(length: int, alpha: float, rank_reduction: bool = True) -> bool:
    """True when every entry of M is 1, so plain bidirectional attention is exact."""
    if length <= 1:
        return True
    # The last row that has an upper-triangle entry is i = l - 1: it is the slowest to open.
    return alpha * length / (length - 1) >= 1.0 if rank_reduction else alpha >= 1.0


@functools.lru_cache(maxsize=8)
def _cached_bias(length: int, alpha: float, rank_reduction: bool, dtype: torch.dtype,
                 device: str) -> torch.Tensor:
    return soft_mask_matrix(length, alpha, rank_reduction, torch.float64, device).log().to(dtype)


def soft_mask_bias(length: int, alpha: float, rank_reduction: bool = True,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """log M(t) as an additive (l, l) attention bias; cached per (length, alpha), shared by batch and heads."""
    return _cached_bias(length, float(alpha), rank_reduction, dtype, str(torch.device(device)))


def soft_mask_score_mod(length: int, alpha: float, rank_reduction: bool = True,
                        device: torch.device | str | None = None, positions: torch.Tensor | None = None) -> Callable:
    """FlexAttention score_mod adding log M(t) on the fly, without materialising an (l, l) tensor; `positions` gives
    each token's position in its own text for a packed row (whose block mask keeps attention within a text).

    alpha and l enter through a captured 0-d tensor, not Python floats: a compiled kernel guards on the constants
    its closure holds, so a float alpha (it moves every step of the schedule) would recompile it every step."""
    log_alpha = math.log(alpha) if alpha > 0 else -math.inf
    # rank reduction: log(min(alpha * l / i, 1)) = min(log alpha + log l - log i, 0), with i = q_idx + 1
    offset = torch.tensor(log_alpha + (math.log(length) if rank_reduction else 0.0), device=device)

    def score_mod(score, batch, head, q_idx, kv_idx):
        i = q_idx if positions is None else positions[q_idx]
        upper = offset - torch.log((i + 1).to(score.dtype)) if rank_reduction else offset
        return torch.where(q_idx >= kv_idx, score, score + torch.clamp(upper, max=0.0))

    return score_mod
