"""Activation checkpointing and FSDP2 data parallelism of a (possibly tensor-parallel) LlamaFusion.

One FSDP2 unit per FusionBlock plus the root (embeddings, heads, U-Nets, BOI/EOI rows): a block's text and image
weights are gathered together just before it runs, frozen and trainable ones in the same unit (FSDP2 reduces only
the gradients that exist). Over dp_shard alone this is full sharding; with dp_replicate > 1 the mesh is 2-D and
FSDP2 shards within dp_shard and all-reduces across dp_replicate (hybrid sharding)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from megafusion.model.block import FusionBlock
from megafusion.model.fusion import LlamaFusion


def apply_activation_checkpointing(model: LlamaFusion) -> None:
    """Recompute each block's activations in backward instead of keeping them (after tp, before FSDP, as
    torchtitan orders it, so FSDP re-gathers the block's weights for the recomputation)."""
    for i, block in enumerate(model.layers):
        if isinstance(block, FusionBlock):
            model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fsdp(
    model: LlamaFusion,
    dp_mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> LlamaFusion:
    """fully_shard every block, then the root. Gradients are SUMMED over the data-parallel ranks (not averaged):
    each rank's loss must already be normalised by the global number of targets (see parallel.reduce.dp_sum)."""
    mp_policy = mp_policy or MixedPrecisionPolicy()
    _backward_through_every_block(model)
    # fully_shard refuses a bare ModuleList (torch 2.13), so the list itself stays plain and each block is a unit.
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    # The root is gathered first in forward and needed again right after the last block: keep it gathered.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp_policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # A loss normalised by global counts makes the global gradient the plain sum of the ranks' gradients.
            module.set_gradient_divide_factor(1.0)
            # Factor 1 otherwise becomes a PREMUL_SUM reduce op, which gloo lacks; a plain SUM is the same here.
            module.set_force_sum_reduction_for_comms(True)
            # A micro-batch without images leaves the image path unused on that rank only; the others still
            # reduce those gradients, so this rank must join the collective with zeros (else it hangs).
            module.set_reduce_scatter_unused_params(True, recurse=False)
    return model


def _backward_through_every_block(model: LlamaFusion) -> None:
    """Every data-parallel rank must issue FSDP's backward collectives (re-gather, then reduce-scatter, block by
    block) in the same order. A micro-batch with no image and no BOI/EOI has no gradient path into the blocks
    while the text set is frozen, so on that rank no block would run its backward hooks while the other ranks
    wait for its all-gathers: a hang. Making the embedding output require grad puts every block in every rank's
    backward (activation gradients only; frozen weights still get none)."""

    def require_grad(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not output.requires_grad:
            output = output.requires_grad_()
        return output

    model.embed_tokens.register_forward_hook(require_grad)


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
