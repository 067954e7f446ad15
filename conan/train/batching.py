"""Turning rows into tensors and moving them between ranks: shared by the stages and the supervised tasks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def pad_batch(sequences: list[list[int]], pad_id: int, label_sequences: list[list[int]] | None = None) -> dict:
    """Right-pad token id lists into input_ids / attention_mask (and labels, -100 on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if label_sequences is not None:
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(label_sequences):
            labels[i, :len(s)] = torch.tensor(s)
        batch["labels"] = labels
    return batch


def to_device(batch, device: torch.device):
    """Move every tensor of a (nested) batch to the device."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def batch_tokens(batch: dict) -> int:
    """Non-padding tokens in every text group (padded or packed) of a batch."""
    return sum(len(v["documents"]) if "documents" in v else int(v["attention_mask"].sum())
               for v in batch.values() if isinstance(v, dict) and "input_ids" in v)


def gather_detached(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a no-grad tensor from every rank (rank order); identity without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)
