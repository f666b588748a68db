"""Pipeline parallel (torch.distributed.pipelining) composed with tensor parallel and FSDP2, torchtitan's order:
pipeline split -> per stage: tensor parallel -> activation checkpointing -> FSDP2.

    plan = plan_pipeline(pp=2, schedule="1f1b", microbatches=4, pp_layers=[], num_layers=L, ...)
    mesh = build_pipeline_mesh(plan.pp, layout)            # dims (pp, dp_replicate, dp_shard, tp) + flattened dp
    stages = build_stages(meta_model, plan, pp_rank(mesh), max_images)
    for s in stages: parallelize_stage(s, mesh); load_stage_weights(s, full_state_dict)
    runner = PipelineRunner(plan, stages, mesh)
    sums = runner.step(input_ids, images, meta, normalizer, loss_weight)   # forward + backward of m micro-batches

The pp dimension is outermost: a stage's dp x tp ranks are neighbours, and stage boundaries (one send of h and the
skip per micro-batch) cross the slower links. Gradients are not scaled by the schedule (scale_grads=False): the
loss of every micro-batch is already normalised by the step's global counts (training/step.global_normalizer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from megafusion.model.fusion import LlamaFusion
from megafusion.model.rope import rope_inverse_frequencies
from megafusion.parallel.mesh import DP_DIM, MESH_DIMS, MeshLayout, fsdp_mesh, tp_mesh
from megafusion.parallel.pipeline_split import PipelinePlan
from megafusion.parallel.pipeline_stage import FusionStage
from megafusion.parallel.styles import ReplicateLocally
from megafusion.parallel.tensor_parallel import block_plan

PP_DIM = "pp"


def build_pipeline_mesh(pp: int, layout: MeshLayout, device_type: str | None = None) -> DeviceMesh:
    """The run's mesh with the pipeline dimension outermost: (pp, dp_replicate, dp_shard, tp) + flattened "dp".
    tp_mesh / dp_mesh / fsdp_mesh of megafusion.parallel.mesh work on it unchanged."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    world = dist.get_world_size()
    if pp * layout.world_size != world:
        raise ValueError(f"parallel.pp ({pp}) x {layout} covers {pp * layout.world_size} ranks, world size {world}")
    mesh = init_device_mesh(device_type, (pp, layout.dp_replicate, layout.dp_shard, layout.tp),
                            mesh_dim_names=(PP_DIM, *MESH_DIMS))
    mesh[("dp_replicate", "dp_shard")]._flatten(DP_DIM)  # as build_device_mesh: no public flatten in torch 2.13
    return mesh


def pp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    return mesh[PP_DIM]


def build_stages(model: LlamaFusion, plan: PipelinePlan, pp_rank: int, max_images: int) -> list[FusionStage]:
    """This rank's stages, taking their modules from `model` (built on the meta device, lr-0 groups frozen)."""
    last = plan.num_stages - 1
    return [FusionStage(model, plan.stage_layers[s], first=s == 0, last=s == last, max_images=max_images)
            for s in plan.stages_of_rank(pp_rank)]


class RankModel(nn.Module):
    """This rank's stages seen as ONE module under the full model's parameter names (their layers merged into one
    `layers` dict): what the optimizer groups and the DCP state dict read, so a checkpoint's keys do not depend on
    how many stages a rank holds. The stages stay the FSDP roots and what the schedule runs."""

    def __init__(self, stages: Sequence[FusionStage]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        for stage in stages:
            for name, child in stage.named_children():
                if name == "layers":
                    self.layers.update(child)
                elif name != "rotary":
                    self.add_module(name, child)
            for name, param in stage.named_parameters(recurse=False):
                self.register_parameter(name, param)

    def grouped_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """As LlamaFusion.grouped_parameters (build_optimizer's input)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"text": [], "image": []}
        for name, p in self.named_parameters():
            groups[LlamaFusion.parameter_group(name)].append((name, p))
        return groups


# ---------------------------------------------------------------------------------------------- per-stage parallel
def _stage_root_plan(stage: FusionStage) -> tuple[dict[str, ParallelStyle], list[str]]:
    """parallel.tensor_parallel.root_plan / root_params for the modules this stage holds."""
    plan: dict[str, ParallelStyle] = {}
    params: list[str] = []
    if stage.first:
        plan["unet_down"] = ReplicateLocally()
        params.append("special_embed")
        if not stage.tied:
            plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if stage.last:
        plan.update(norm=ReplicateLocally(), unet_up=ReplicateLocally())
        params.append("special_head")
        if not stage.tied:
            plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    if stage.tied and hasattr(stage, "embed_tokens"):
        params.append("embed_tokens.weight")  # read as a plain matrix by the LM head: replicated
    return plan, params


def apply_stage_tensor_parallel(stage: FusionStage, mesh: DeviceMesh) -> None:
    tp = mesh.size()
    requires_grad = {name: p.requires_grad for name, p in stage.named_parameters()}
    for block in stage.layers.values():
        parallelize_module(block, mesh, block_plan(block))
        block.num_heads //= tp
        block.num_kv_heads //= tp
    plan, params = _stage_root_plan(stage)
    parallelize_module(stage, mesh, plan)
    parallelize_module(stage, mesh, ReplicateLocally(params=params))
    for name, p in stage.named_parameters():
        p.requires_grad_(requires_grad[name])  # a style's re-registration must not unfreeze the text set
        if not isinstance(p, DTensor) or p.device_mesh != mesh:
            raise RuntimeError(f"{name} was left out of the stage's tensor-parallel plan (clipping needs one mesh)")


def apply_stage_fsdp(stage: FusionStage, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None) -> None:
    """As parallel.fsdp.apply_fsdp, per stage. Blocks stay gathered between micro-batches (torchtitan's default
    under pp): resharding after every micro-batch's forward would all-gather each block once per micro-batch."""
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for block in stage.layers.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy)
    fully_shard(stage, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy)
    for module in stage.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # globally normalised loss: gradients are summed
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
            module.set_reduce_scatter_unused_params(True, recurse=False)


def parallelize_stage(stage: FusionStage, mesh: DeviceMesh, *, activation_checkpointing: bool = False,
                      mp_policy: MixedPrecisionPolicy | None = None) -> FusionStage:
    """tp -> activation checkpointing -> FSDP2 on one stage, over this pp rank's (dp_replicate, dp_shard, tp)."""
    if mesh["tp"].size() > 1:
        apply_stage_tensor_parallel(stage, tp_mesh(mesh))
    if activation_checkpointing:
        for key in list(stage.layers.keys()):
            stage.layers[key] = checkpoint_wrapper(stage.layers[key], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if mesh[DP_DIM].size() > 1:
        apply_stage_fsdp(stage, fsdp_mesh(mesh), mp_policy)
    return stage


def load_stage_weights(stage: FusionStage, full_state_dict: Mapping[str, torch.Tensor],
                       device: torch.device | str = "cpu") -> FusionStage:
    """Allocate a (parallelised) meta stage on `device` and fill it from a full LlamaFusion state dict that this
    rank holds (every rank of the stage's dp x tp group must pass the same). Collective within that group."""
    own = {_plain(name) for name in stage.state_dict()}
    stage.to_empty(device=device)
    set_model_state_dict(stage, {k: v for k, v in full_state_dict.items() if k in own},
                         options=StateDictOptions(full_state_dict=True, strict=True))
    stage.rotary.inv_freq = rope_inverse_frequencies(stage.arch).to(device)  # non-persistent: not in any dict
    return stage


def _plain(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


# ---------------------------------------------------------------------------------------------- schedule
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
# Tensors of the whole step that every stage receives, split along dim 0 into the micro-batches.
STAGE_KWARGS = ("modality", "doc_ids", "timesteps", "image_weights", "targets", "noise")


class PipelineRunner:
    """Runs one schedule call (forward and backward of plan.microbatches micro-batches) on this rank's stages."""

    def __init__(self, plan: PipelinePlan, stages: Sequence[FusionStage], mesh: DeviceMesh,
                 device: torch.device | str = "cpu") -> None:
        self.plan, self.stages, self.device = plan, list(stages), torch.device(device)
        self.group = pp_mesh(mesh).get_group()
        self.pp_rank = pp_mesh(mesh).get_local_rank()
        pipeline_stages = [PipelineStage(stage, index, plan.num_stages, self.device, group=self.group)
                           for stage, index in zip(stages, plan.stages_of_rank(self.pp_rank), strict=True)]
        cls = SCHEDULES[plan.schedule]
        one = pipeline_stages[0] if plan.stages_per_rank == 1 else pipeline_stages
        self.schedule = cls(one, n_microbatches=plan.microbatches, loss_fn=self._loss, scale_grads=False)
        self._sums: list[torch.Tensor] = []
        self.has_first = any(s.first for s in self.stages)
        self.last_rank = plan.rank_of_stage(plan.num_stages - 1)

    def _loss(self, output: torch.Tensor, _index: torch.Tensor, *, normalizer: Any, loss_weight: float
              ) -> torch.Tensor:
        """Called once per micro-batch on the last stage: its (1, 2) loss sums, normalised by the step's global
        counts."""
        self._sums.append(output.detach())
        return normalizer.loss(output[0, 0], output[0, 1], loss_weight)

    def step(self, input_ids: torch.Tensor, images: torch.Tensor, meta: dict[str, torch.Tensor],
             normalizer: Any, loss_weight: float) -> torch.Tensor:
        """input_ids (m*B, S), images (m*K, C, H, W) noisy latents padded to K per micro-batch, meta: STAGE_KWARGS
        tensors stacked the same way. Returns the (m, 2) [CE sum, squared-error sum] per micro-batch on every pp
        rank (the last stage computes them)."""
        self._sums.clear()
        args = (input_ids.to(self.device), images.to(self.device)) if self.has_first else ()
        kwargs = {k: meta[k].to(self.device) for k in STAGE_KWARGS}
        # `target` only indexes the micro-batch: the loss terms come out of the last stage itself.
        self.schedule.step(*args, target=torch.arange(self.plan.microbatches), return_outputs=False,
                           loss_kwargs={"normalizer": normalizer, "loss_weight": loss_weight}, **kwargs)
        sums = torch.zeros(self.plan.microbatches, 2, dtype=torch.float64)
        if self._sums:
            # The first step also calls the loss once for metadata inference (no parameter gradient): skip it.
            sums = torch.cat(self._sums[-self.plan.microbatches:]).double()
        if dist.get_world_size(self.group) > 1:
            dist.broadcast(sums, group=self.group, group_src=self.last_rank)
        return sums


@torch.no_grad()
def pipeline_clip_grad_norm_(parameters: Sequence[nn.Parameter], max_norm: float, mesh: DeviceMesh) -> torch.Tensor:
    """clip_grad_norm_ over all stages: each stage's norm (over its own meshes) squared, summed over pp."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    square = total.double().pow(2).reshape(1)
    group = pp_mesh(mesh)
    if group.size() > 1:
        dist.all_reduce(square, group=group.get_group())
    total = square.sqrt().reshape(()).to(total.dtype)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


__all__ = [
    "PP_DIM", "PipelineRunner", "RankModel", "build_pipeline_mesh", "build_stages", "load_stage_weights",
    "parallelize_stage", "pipeline_clip_grad_norm_", "pp_mesh",
]
