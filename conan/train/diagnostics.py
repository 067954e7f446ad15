"""Is a stage learning? Figures read off what its loss already computed (no extra forward pass).

A contrastive loss that stays near log N (N = candidates per query) learned nothing, and embeddings whose random pairs
sit at cosine 0.9+ have collapsed: InfoNCE without a usable signal is minimised by scoring everything alike. A causal
LM whose loss does not fall below its corpus's unigram entropy predicts token frequencies, not text.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CHANCE_WARNING = 0.9  # warn when loss > 0.9 · log N …
WARN_AFTER = 0.2  # … after a fifth of the steps


def contrastive_stats(scores: torch.Tensor, positive_index: torch.Tensor, candidates: torch.Tensor | None,
                      positives: torch.Tensor, hard_negatives: torch.Tensor | None = None) -> dict[str, float]:
    """Mean cosines of the positives, of every other candidate, of the queries' own hard negatives (when given), of
    random pairs of distinct positive passages, and log N (candidates per query) — from the loss's (N, M) cosines.

    positives: the rows' positive passage embeddings (any norm); hard_negatives: (N, k) cosines of own negatives,
    NaN in the slots a row could not fill."""
    n = len(positive_index)
    rows = torch.arange(n, device=scores.device)
    allowed = torch.ones_like(scores, dtype=torch.bool) if candidates is None else candidates.clone()
    counts = allowed.sum(1).double()
    allowed[rows, positive_index] = False
    unit = F.normalize(positives.detach().float(), dim=-1)
    pairs = unit @ unit.T
    off_diagonal = ~torch.eye(len(unit), dtype=torch.bool, device=unit.device)
    out = {"positive_cos": float(scores[rows, positive_index].mean()),
           "negative_cos": float(scores[allowed].mean()) if allowed.any() else float("nan"),
           "random_pair_cos": float(pairs[off_diagonal].mean()) if len(unit) > 1 else float("nan"),
           "log_candidates": float(counts.log().mean())}
    if hard_negatives is not None:
        out["hard_negative_cos"] = float(hard_negatives.nanmean())
    return out


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token distribution with these counts: the loss of a model that predicts only token
    frequencies."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def chance_warning(stage: str, step: int, total: int, chance_ratio: float) -> str | None:
    """The log line warning that a contrastive loss is still near chance (loss ÷ log N above CHANCE_WARNING) after a
    fifth of the steps, else None."""
    if step < WARN_AFTER * total or chance_ratio <= CHANCE_WARNING:
        return None
    return (f"[{stage}] WARNING: step {step}/{total}: a contrastive loss is still {chance_ratio:.2f} · log N (> "
            f"{CHANCE_WARNING}, N = candidates per query): the model is barely learning; check the random-pair cosine "
            "(collapse), the lr, the temperature and the data")
