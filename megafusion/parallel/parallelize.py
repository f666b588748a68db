"""parallelize_fusion: tensor parallel -> activation checkpointing -> FSDP2, in torchtitan's order."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from megafusion.model.fusion import LlamaFusion
from megafusion.parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from megafusion.parallel.mesh import check_parallel_support, fsdp_mesh, layout_of, tp_mesh
from megafusion.parallel.tensor_parallel import apply_tensor_parallel


def parallelize_fusion(
    model: LlamaFusion,
    mesh: DeviceMesh,
    *,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> LlamaFusion:
    """Distribute `model` in place over `mesh` (from build_device_mesh) and return it.

    Freeze parameters (requires_grad=False) BEFORE calling: the frozen text set is sharded like the rest but gets
    no gradient and no optimizer state. The model must be the same on every rank (a model built on the meta
    device and then `materialize`d is, by construction). After this, each rank's loss must be normalised by the
    global counts (parallel.reduce.dp_sum): FSDP sums gradients over the data-parallel ranks."""
    layout = layout_of(mesh)
    layout.resolve(mesh.size(), model.arch)
    check_parallel_support(layout, engine="torch", attention=model.attention_backend,
                           routing=model.routing_backend)
    if layout.tp > 1:
        apply_tensor_parallel(model, tp_mesh(mesh))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if layout.dp > 1:
        apply_fsdp(model, fsdp_mesh(mesh), reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    return model
