"""Read a pretrained Llama checkpoint (HF directory with safetensors, sharded or not, or a .gguf file)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPECTED = (
    "an HF Llama directory (config.json + model.safetensors or a sharded model.safetensors.index.json) "
    "or a .gguf file"
)


class CheckpointError(ValueError):
    """The path is not a readable Llama checkpoint; the message names the file and what was expected."""


@dataclass
class LlamaCheckpoint:
    config: dict
    state_dict: dict[str, torch.Tensor]
    config_source: str
    weights_source: str


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' of tensor -> shard file") from err
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (directory / s).is_file()]
        if absent:
            raise CheckpointError(f"{index}: shard file(s) {absent} listed in weight_map are missing from {directory}")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_safetensors(directory / shard))
        not_found = [k for k, s in weight_map.items() if k not in state]
        if not_found:
            raise CheckpointError(f"{index}: tensors {not_found[:3]} are not in the shards that list them")
        return state, str(index)
    single = directory / SINGLE_FILE
    if single.is_file():
        return _load_safetensors(single), str(single)
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: only pickle weights (*.bin/*.pt) found; megafusion loads safetensors only "
            "(convert them with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; expected {EXPECTED}")


def read_llama_checkpoint(path: str | os.PathLike) -> LlamaCheckpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist; expected {EXPECTED}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: is a file but not a .gguf file; expected {EXPECTED}")
        from megafusion.checkpoint.gguf import load_gguf

        config, state = load_gguf(path)
        return LlamaCheckpoint(config, state, str(path), str(path))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; expected {EXPECTED}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: invalid JSON ({err})") from err
    state, weights_source = _read_weights(path)
    return LlamaCheckpoint(config, state, str(config_file), weights_source)
