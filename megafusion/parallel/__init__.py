"""The PyTorch-native parallel engine: one named device mesh (dp_replicate, dp_shard, tp), DTensor tensor
parallelism of both weight sets, activation checkpointing, FSDP2 (full or hybrid) data parallelism.

    layout = MeshLayout(dp_shard=-1, tp=2).resolve(world_size, model.arch)
    mesh = build_device_mesh(layout)
    parallelize_fusion(model, mesh)              # or: build_on_meta(...) -> parallelize_fusion -> materialize
    ...
    loss = lm_sum / dp_sum(num_targets, mesh) + lam * mse_sum / dp_sum(num_latent_elements, mesh)
    clip_grad_norm_(model.parameters(), max_norm)
"""

from megafusion.parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from megafusion.parallel.grad_clip import clip_grad_norm_
from megafusion.parallel.materialize import build_on_meta, materialize
from megafusion.parallel.mesh import (
    MESH_DIMS,
    MeshLayout,
    build_device_mesh,
    check_parallel_support,
    dp_mesh,
    fsdp_mesh,
    layout_of,
    tp_mesh,
)
from megafusion.parallel.parallelize import parallelize_fusion
from megafusion.parallel.reduce import dp_sum
from megafusion.parallel.tensor_parallel import apply_tensor_parallel

__all__ = [
    "MESH_DIMS",
    "MeshLayout",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_device_mesh",
    "build_on_meta",
    "check_parallel_support",
    "clip_grad_norm_",
    "dp_mesh",
    "dp_sum",
    "fsdp_mesh",
    "layout_of",
    "materialize",
    "parallelize_fusion",
    "tp_mesh",
]
