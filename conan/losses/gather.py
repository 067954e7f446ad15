"""All-gather that keeps gradients, so in-batch negatives span the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order); identity without a process group.

    The autograd all-gather sums each slice's gradient over ranks in backward, so with the data
    parallel gradient average the result equals the single-process gradient of the global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()), dim=0)
