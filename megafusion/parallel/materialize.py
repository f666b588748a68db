"""From a model built on the meta device (no memory) to real, parallelised weights: allocate only this rank's
shards after parallelize_fusion, then fill them from ONE full state dict held by rank 0 (torchtitan's order)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from megafusion.model.fusion import LlamaFusion
from megafusion.model.rope import RotaryEmbedding, rope_inverse_frequencies


def build_on_meta(*args: object, **kwargs: object) -> LlamaFusion:
    """LlamaFusion(*args, **kwargs) with every parameter and buffer on the meta device."""
    with torch.device("meta"):
        return LlamaFusion(*args, **kwargs)


def materialize(model: LlamaFusion, full_state_dict: Mapping[str, torch.Tensor] | None,
                device: torch.device | str = "cpu") -> LlamaFusion:
    """Allocate a parallelised meta model on `device` and load `full_state_dict` (a plain LlamaFusion.state_dict(),
    needed on rank 0 only; other ranks pass None) into every rank's shards by broadcast from rank 0.
    Collective: every rank calls it."""
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, dict(full_state_dict or {}), options=options)
    _reset_derived_buffers(model, torch.device(device))
    return model


def _reset_derived_buffers(model: LlamaFusion, device: torch.device) -> None:
    # Non-persistent buffers are not in any state dict, and to_empty left them uninitialised: recompute them.
    for name, module in model.named_modules():
        derived = set(getattr(module, "_non_persistent_buffers_set", ()))
        if not derived:
            continue
        if isinstance(module, RotaryEmbedding) and derived == {"inv_freq"}:
            module.inv_freq = rope_inverse_frequencies(model.arch).to(device)
            continue
        raise RuntimeError(f"{name or 'model'}: non-persistent buffers {sorted(derived)} have no initialiser here")
