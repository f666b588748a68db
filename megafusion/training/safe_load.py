"""Loading run checkpoints without executing pickled code.

DeepSpeed's TorchCheckpointEngine calls `torch.load(..., weights_only=False)`, so a checkpoint file can run any
code on resume. Every file a run directory holds is loaded here with `weights_only=True` instead, allowing only
the few plain DeepSpeed classes its optimizer states pickle (found with
`torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3, fp32 and bf16 checkpoints)."""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch

# module, class name: plain data holders (enum, loss-scaler settings, fragment index) with no code on unpickling.
ALLOWED_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain data."""


def _allowed() -> list[Any]:
    import importlib

    found = []
    for module, name in ALLOWED_DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: what it does not have cannot be in its files either
    return found


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """torch.load with weights_only=True and the DeepSpeed allowlist; anything else is refused, naming the file."""
    with torch.serialization.safe_globals(_allowed()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
            reason = f"a reference to {found.group(1)}" if found else type(err).__name__
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it holds objects that are not tensors or plain data ({reason}); "
                "megafusion never unpickles code from a checkpoint"
            ) from err


def install_safe_loading(engine: Any) -> None:
    """Routes a DeepSpeed engine's checkpoint reads through `safe_torch_load`."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
