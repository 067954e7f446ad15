"""The language-modelling head's cross-entropy, fused with the head and computed in chunks of tokens.

    L = -(1/|T|) Σ_{t∈T} log softmax(h_t Wᵀ)[y_t],   T = the tokens whose label is not -100

The plain way materialises the logits of every token ((tokens, vocab): 16.8M floats for the tiny preset's
micro-batch, 4.9G at the 1.4B preset's 32k context and 150k vocabulary), then the log-softmax, a slice for the shift
and their gradients, each a full pass over memory. Here the forward pass takes the tokens a chunk at a time, computes
the chunk's logits, its loss and at once its gradients (softmax − one-hot, times the head and the hidden states), and
keeps only those: memory is one chunk's logits, and the backward pass scales the kept gradients (Liger-Kernel's fused
linear cross-entropy, Hsu et al. 2024, whose chunk rule this follows: a chunk's logits about as large as the hidden
states, here at least 256 tokens on CPU and 4,096 on accelerators). Loss and gradients equal the plain computation's
up to float rounding.
"""

from __future__ import annotations

import torch


def min_chunk_tokens(device_type: str) -> int:
    """The fewest tokens a chunk. Each chunk ends with a pass over the head's fp32 gradient (vocab × d) that the
    chunk's matmuls (6 · tokens · vocab · d FLOPs) must outweigh: a CPU does ~7 FLOPs a byte moved, where 256 tokens
    suffice (fewer make the matmuls too thin: 32 tokens ran 2× slower); a GPU does ~180, where it takes thousands
    (conan-1.4b on an H200 in 391-token chunks: 133 ms of a 485 ms step went to those passes)."""
    return 256 if device_type == "cpu" else 4096


def chunk_tokens(tokens: int, hidden_size: int, vocab_size: int, device_type: str = "cpu") -> int:
    """Tokens per chunk: the chunk's logits about the size of all tokens' hidden states (Liger's rule), and at least
    min_chunk_tokens for the device."""
    return min(tokens, max(min_chunk_tokens(device_type), tokens * hidden_size // vocab_size))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weightᵀ against labels; the gradients are made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, step: int,
                needs_grad: bool) -> torch.Tensor:
        """hidden (N, d), weight (V, d), labels (N,) with -100 = ignored, `step` tokens a chunk; returns the mean
        loss (fp32), making the gradients too when `needs_grad`."""
        keep = labels != -100
        count = int(keep.sum())
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(hidden), step):
            h, y, k = hidden[start:start + step], labels[start:start + step], keep[start:start + step]
            if not bool(k.any()):
                continue
            h, y = h[k], y[k]
            logits = (h @ weight.T).float()
            log_norm = torch.logsumexp(logits, dim=1)
            rows = torch.arange(len(y), device=y.device)
            total += (log_norm - logits[rows, y]).sum()
            if needs_grad:  # d/dlogits = softmax − one-hot, computed in place on the chunk's logits
                probs = logits.sub_(log_norm[:, None]).exp_()
                probs[rows, y] -= 1.0
                probs = probs.to(hidden.dtype)
                grad_hidden[start:start + step][k] = probs @ weight
                grad_weight += (probs.T @ h).float()
        scale = 1.0 / max(count, 1)
        if needs_grad:
            ctx.save_for_backward(grad_hidden.mul_(scale), grad_weight.mul_(scale).to(weight.dtype))
        return total * scale if count else total.fill_(float("nan"))

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        """The kept gradients times the incoming scalar."""
        grad_hidden, grad_weight = ctx.saved_tensors
        grads = grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype)
        return (*grads, None, None, None)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of hidden states (batch, seq, d) under the head `weight` (vocab, d): position t
    predicts labels[:, t + 1]; labels of -100 are ignored (NaN when none is left, as F.cross_entropy gives).
    `chunk` tokens a chunk (default: chunk_tokens)."""
    hidden, labels = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    step = chunk or chunk_tokens(len(hidden), hidden.shape[1], weight.shape[0], hidden.device.type)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, step, needs_grad)
