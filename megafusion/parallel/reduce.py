"""Sums over the data-parallel ranks that the training step needs (the loss is normalised by global counts)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from megafusion.parallel.mesh import dp_mesh


def dp_sum(value: torch.Tensor | int | float, mesh: DeviceMesh) -> torch.Tensor:
    """`value` summed over the data-parallel ranks of `mesh` (every tp rank of a replica holds the same value, so
    the tp dimension is not summed). E.g. the global number of text targets of one step."""
    if isinstance(value, torch.Tensor):
        total = value.detach().clone()
    else:
        # Counts stay exact integers; the collective backend needs the mesh's device (NCCL: the current GPU).
        dtype = torch.int64 if isinstance(value, int) else torch.float64
        total = torch.tensor(value, dtype=dtype, device=mesh.device_type)
    group = dp_mesh(mesh)
    if group.size() > 1:
        dist.all_reduce(total, group=group.get_group())
    return total
