"""Gradient-norm clipping over every mesh of a parallelised model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    foreach: bool | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for DTensor gradients; returns the total norm as a plain scalar, the same on
    every rank. Needs every gradient on one mesh (parallelize_fusion guarantees it)."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type, foreach=foreach)
    # Over sharded gradients the norm is a Partial DTensor (each rank holds its shards' part): reduce it once, as
    # torchtitan does, so the clip coefficient below is one plain number.
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total
