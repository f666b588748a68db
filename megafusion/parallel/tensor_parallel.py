"""Tensor parallelism of a LlamaFusion over the tp mesh (Megatron's split, built with DTensor styles).

Per FusionBlock and per weight set (text and image, or the one `shared` set, whatever the separation):
  * Q, K, V and the FFN's gate / up: ColwiseParallel (each rank owns whole heads and a slice of the FFN width);
  * O (`attn_out`) and the FFN's down: RowwiseParallel (one all-reduce of the output in forward);
  * the pre-attention / pre-FFN norms: replicated, their output handed to the column-parallel projections as a
    Replicate DTensor, so their input gradient is all-reduced once per sub-block in backward.
Each block then works on its rank's heads: num_heads / tp and num_kv_heads / tp (the GQA grouping stays local
because column sharding keeps head order: rank r holds query heads r*H/tp.. and key/value heads r*H_kv/tp..).

Outside the blocks: an untied embedding table is split by vocabulary rows (RowwiseParallel: masked lookup, then
all-reduce) and an untied LM head by vocabulary columns (logits all-gathered); a tied table stays replicated,
because the LM head reads it inside LlamaFusion.forward as a plain matrix. The final norm, the U-Nets and the
BOI/EOI rows are replicated (styles.ReplicateLocally). Frozen text weights are split like trainable ones (they
are most of the memory) and keep requires_grad=False.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from megafusion.model.block import FusionBlock
from megafusion.model.fusion import LlamaFusion
from megafusion.model.layers import AttentionInput, FeedForward
from megafusion.model.routing import Routed
from megafusion.parallel.styles import ReplicateLocally

WEIGHT_SETS = ("text", "image", "shared")


def _weight_sets(routed: Routed) -> list[tuple[str, nn.Module]]:
    return [(name, getattr(routed, name)) for name in WEIGHT_SETS if hasattr(routed, name)]


def block_plan(block: FusionBlock) -> dict[str, ParallelStyle]:
    """The parallelize_module plan of one block, for whichever weight sets its separation created."""
    plan: dict[str, ParallelStyle] = {}
    for name, attn_in in _weight_sets(block.attn_in):
        if not isinstance(attn_in, AttentionInput):
            raise TypeError(f"attn_in.{name}: no tensor-parallel plan for {type(attn_in).__name__}")
        prefix = f"attn_in.{name}"
        plan[f"{prefix}.norm"] = ReplicateLocally(output_dtensor=True)
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan[f"{prefix}.{proj}"] = ColwiseParallel()
    for name, _ in _weight_sets(block.attn_out):
        plan[f"attn_out.{name}"] = RowwiseParallel()
    for name, ffn in _weight_sets(block.ffn):
        if not isinstance(ffn, FeedForward):
            raise TypeError(f"ffn.{name}: no tensor-parallel plan for {type(ffn).__name__}")
        prefix = f"ffn.{name}"
        plan[f"{prefix}.norm"] = ReplicateLocally(output_dtensor=True)
        plan[f"{prefix}.gate_proj"] = ColwiseParallel()
        plan[f"{prefix}.up_proj"] = ColwiseParallel()
        plan[f"{prefix}.down_proj"] = RowwiseParallel()
    return plan


def root_plan(model: LlamaFusion) -> dict[str, ParallelStyle]:
    """Plan of everything outside the blocks (BOI/EOI rows and, if tied, the embedding: see root_params)."""
    plan: dict[str, ParallelStyle] = {
        "norm": ReplicateLocally(),
        "unet_down": ReplicateLocally(),
        "unet_up": ReplicateLocally(),
    }
    if model.lm_head is not None:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def root_params(model: LlamaFusion) -> list[str]:
    """Parameters LlamaFusion.forward reads directly rather than through a submodule call."""
    names = ["special_embed", "special_head"]
    if model.lm_head is None:
        names.append("embed_tokens.weight")
    return names


def apply_tensor_parallel(model: LlamaFusion, tp_mesh: DeviceMesh) -> LlamaFusion:
    """Shard `model` in place over `tp_mesh` (1-D); every parameter ends up a DTensor on it. The caller has
    checked that tp divides the heads, key/value heads and FFN width (MeshLayout.resolve)."""
    tp = tp_mesh.size()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for block in model.layers:
        if not isinstance(block, FusionBlock):
            raise TypeError(f"apply tensor parallelism before wrapping the blocks (got {type(block).__name__})")
        if block.num_heads % tp or block.num_kv_heads % tp:
            raise ValueError(f"tp = {tp} does not divide {block.num_heads} heads / {block.num_kv_heads} kv heads")
        parallelize_module(block, tp_mesh, block_plan(block))
        block.num_heads //= tp
        block.num_kv_heads //= tp
    parallelize_module(model, tp_mesh, root_plan(model))
    parallelize_module(model, tp_mesh, ReplicateLocally(params=root_params(model)))

    for name, p in model.named_parameters():
        # A style that re-registers a parameter must not unfreeze the text set (no grads, no optimizer state).
        p.requires_grad_(requires_grad[name])
        if not isinstance(p, DTensor) or p.device_mesh != tp_mesh:
            raise RuntimeError(f"{name} was left out of the tensor-parallel plan (clipping needs one mesh)")
    return model
