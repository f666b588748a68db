"""The parallel layout of the torch engine and its one device mesh (torchtitan-style named dimensions).

A layout is three degrees, dp_replicate x dp_shard x tp = world size, checked against the model's shapes before
any process group exists, so a bad run config fails with a message naming its `parallel.*` keys. The mesh has the
dimensions ("dp_replicate", "dp_shard", "tp") in that order: tp innermost, so a tensor-parallel group is made of
neighbouring ranks (one node on a cluster), and the replicate dimension outermost (across nodes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megafusion.model.arch import LlamaArch

MESH_DIMS: tuple[str, str, str] = ("dp_replicate", "dp_shard", "tp")
# The flattened data-parallel dimension (dp_replicate x dp_shard): one rank of it = one distinct micro-batch.
DP_DIM = "dp"


@dataclass(frozen=True)
class MeshLayout:
    """Degrees of the torch engine (the run config's `parallel` section); dp_shard = -1 means "what is left"."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct micro-batches one step consumes."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    def resolve(self, world_size: int, arch: LlamaArch) -> MeshLayout:
        """This layout with dp_shard filled in, after checking it against the world size and the model's shapes.
        Raises ValueError naming the `parallel.*` keys at fault."""
        for key, value in (("parallel.tp", self.tp), ("parallel.dp_replicate", self.dp_replicate)):
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        if self.dp_shard != -1 and self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard: must be -1 (auto) or >= 1, got {self.dp_shard}")
        fixed = self.tp * self.dp_replicate
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ValueError(
                    f"parallel.tp ({self.tp}) x parallel.dp_replicate ({self.dp_replicate}) = {fixed} does not divide "
                    f"the world size {world_size}, so parallel.dp_shard: -1 has no value"
                )
            dp_shard = world_size // fixed
        if fixed * dp_shard != world_size:
            raise ValueError(
                f"parallel.dp_replicate ({self.dp_replicate}) x parallel.dp_shard ({dp_shard}) x parallel.tp "
                f"({self.tp}) = {fixed * dp_shard}, but the world size is {world_size}"
            )
        # Column-parallel Q/K/V give each rank whole heads, and the GQA grouping must stay rank-local; the SwiGLU
        # FFN is split along its width.
        for what, size in (
            ("query heads (num_attention_heads)", arch.num_heads),
            ("key/value heads (num_key_value_heads)", arch.num_kv_heads),
            ("FFN width (intermediate_size)", arch.intermediate_size),
        ):
            if size % self.tp:
                raise ValueError(f"parallel.tp ({self.tp}) must divide the model's {what} = {size}")
        return MeshLayout(self.dp_replicate, dp_shard, self.tp)


def check_parallel_support(layout: MeshLayout, *, engine: str, attention: str, routing: str) -> None:
    """Refuse run settings that cannot work with `layout`, naming the config keys (call before any work).

    attention: every backend receives q/k/v of the rank's own heads as plain local tensors and none of them
    depends on the head count beyond the tensors' shapes (the hybrid mask is per token), so all are allowed."""
    if engine != "torch" and (layout.tp > 1 or layout.dp_replicate > 1):
        raise ValueError(
            f"parallel.tp ({layout.tp}) / parallel.dp_replicate ({layout.dp_replicate}) need train.engine: torch "
            f"(got train.engine: {engine}); DTensor-sharded weights cannot enter a DeepSpeed engine"
        )
    if layout.tp > 1 and routing != "index":
        # `auto` picks the grouped GEMM on CUDA, so it is refused as well rather than failing on the cluster only.
        raise ValueError(
            f"model.routing: {routing} cannot run under parallel.tp = {layout.tp}: the Triton grouped GEMM reads "
            "each weight set's full (unsharded) weight matrices directly; use model.routing: index"
        )


def build_device_mesh(layout: MeshLayout, device_type: str | None = None) -> DeviceMesh:
    """The one mesh of a run, dims MESH_DIMS (+ the flattened "dp"); needs an initialised default process group
    and a resolved layout."""
    if not dist.is_initialized():
        raise RuntimeError("build_device_mesh needs an initialised torch.distributed (torchrun / init_process_group)")
    world = dist.get_world_size()
    if layout.dp_shard < 1 or layout.world_size != world:
        raise ValueError(f"layout {layout} is not resolved for the world size {world}; call MeshLayout.resolve first")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard, layout.tp), mesh_dim_names=MESH_DIMS)
    # DeviceMesh has no public flatten yet (torch 2.13); torchtitan uses the same private call for its "dp" dim.
    mesh[("dp_replicate", "dp_shard")]._flatten(DP_DIM)
    return mesh


def tp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    return mesh["tp"]


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D (dp_shard) for full sharding, 2-D (dp_replicate, dp_shard) for hybrid."""
    if mesh["dp_replicate"].size() > 1:
        return mesh[("dp_replicate", "dp_shard")]
    return mesh["dp_shard"]


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """All data-parallel ranks as one dimension: the loader shards by its rank, the loss counts sum over it."""
    return mesh[DP_DIM]


def layout_of(mesh: DeviceMesh) -> MeshLayout:
    return MeshLayout(mesh["dp_replicate"].size(), mesh["dp_shard"].size(), mesh["tp"].size())
