"""Replicated parameters with local compute: torchtitan's NoParallel idea, for modules DTensor cannot run.

Gradient clipping and the optimizer's foreach kernels need every trainable parameter on one mesh, so the modules
tensor parallelism does not split (norms, U-Nets, the BOI/EOI rows) still hold their parameters as Replicate
DTensors on the tp mesh. torchtitan's NoParallel then runs the module on DTensors; that fails here because the
modules create plain tensors of their own (diffusers' timestep embedding builds an `arange`, LlamaFusion indexes
its BOI/EOI rows with ids) and DTensor refuses mixed operands. So during the module's forward each parameter is
shown as its local replica (a differentiable `to_local()` view): compute is plain torch, and the gradient comes
back to the DTensor parameter as Replicate. That is exact because every input of such a module, and the gradient
of its output, is identical on all tp ranks (row-parallel outputs are all-reduced in forward, column-parallel
inputs in backward)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


class ReplicateLocally(ParallelStyle):
    """Parameters (all of the module's, or the dotted names in `params`) become Replicate DTensors on the mesh;
    the module's forward sees local replicas. With `output_dtensor` the (single tensor) output is returned as a
    Replicate DTensor: column-parallel projections then take it as is, and the Partial input gradients of all of
    them are summed first and all-reduced ONCE when they reach this boundary (instead of once per projection)."""

    def __init__(self, params: Sequence[str] | None = None, output_dtensor: bool = False) -> None:
        super().__init__()
        self.params = None if params is None else tuple(params)
        self.output_dtensor = output_dtensor

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        names = self.params if self.params is not None else tuple(n for n, _ in module.named_parameters())
        owners = [_owner(module, name) for name in names]
        for owner, leaf in owners:
            param = owner._parameters[leaf]
            if isinstance(param, DTensor):
                raise ValueError(f"{type(owner).__name__}.{leaf} is already distributed")
            dist_param = distribute_tensor(param.data, device_mesh, [Replicate()], src_data_rank=self.src_data_rank)
            owner.register_parameter(leaf, nn.Parameter(dist_param, requires_grad=param.requires_grad))

        def show_local(_module: nn.Module, _args: Any) -> None:
            # Read the registered parameter now, not at _apply time: FSDP2 swaps in its unsharded DTensor in its
            # own pre-forward hook, which runs before this one (FSDP prepends its hooks).
            for owner, leaf in owners:
                param = owner._parameters[leaf]
                # An instance attribute shadows the _parameters entry (nn.Module only falls back to __getattr__).
                owner.__dict__[leaf] = param.to_local() if isinstance(param, DTensor) else param

        def hide_local(_module: nn.Module, _args: Any, output: Any) -> Any:
            for owner, leaf in owners:
                owner.__dict__.pop(leaf, None)
            if self.output_dtensor and isinstance(output, torch.Tensor) and not isinstance(output, DTensor):
                return DTensor.from_local(output, device_mesh, [Replicate()], run_check=False)
            return output

        module.register_forward_pre_hook(show_local)
        module.register_forward_hook(hide_local, always_call=True)
        return module
