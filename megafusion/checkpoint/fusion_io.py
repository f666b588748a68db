"""Reading and writing LlamaFusion models: built from a pretrained Llama (HF dir or .gguf), or saved as one
directory (model.safetensors + fusion_config.json) that carries everything sampling needs: architecture, image and
U-Net shapes, separation, backends, the diffusion settings it was trained with and its document prefix."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from megafusion.checkpoint.llama_reader import read_llama_checkpoint
from megafusion.checkpoint.names import load_text_state
from megafusion.common.atomic import atomic_directory
from megafusion.model.arch import LlamaArch
from megafusion.model.args import DiffusionArgs, ImageConfig, UNetConfig

if TYPE_CHECKING:
    from megafusion.model.fusion import LlamaFusion

FUSION_CONFIG_NAME = "fusion_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "megafusion.LlamaFusion"
# 2: adds `diffusion` and `document_prefix`; version-1 directories load with the defaults they were trained with.
FORMAT_VERSION = 2


def build_from_llama(
    cls: type[LlamaFusion],
    path: str | os.PathLike,
    separation: str = "deep",
    image: ImageConfig | None = None,
    unet: UNetConfig | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    routing: str = "index",
) -> LlamaFusion:
    """Text set = the pretrained LM, image set = a copy of it, U-Nets from scratch."""
    checkpoint = read_llama_checkpoint(path)
    arch = LlamaArch.from_hf_config(checkpoint.config, source=checkpoint.config_source)
    model = cls(arch, separation, image, unet, attention, routing)
    load_text_state(model, checkpoint.state_dict, checkpoint.weights_source)
    model.init_image_set_from_text()
    model.base_path = str(path)
    return model.to(dtype)


def fusion_metadata(model: LlamaFusion) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "separation": model.separation,
        "attention": model.attention_backend,
        "routing": model.routing_backend,
        "arch": model.arch.to_dict(),
        "image": asdict(model.image_config),
        "unet": asdict(model.unet_config),
        "diffusion": asdict(model.diffusion_args),
        "document_prefix": model.document_prefix,
        "base_path": model.base_path,
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
    }


def save_fusion(model: LlamaFusion, out_dir: str | os.PathLike) -> Path:
    """All weights (safetensors) + metadata; written to a temp dir and renamed into place."""
    with atomic_directory(out_dir) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / FUSION_CONFIG_NAME).write_text(json.dumps(fusion_metadata(model), indent=2))
    return Path(out_dir)


def read_fusion_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The fusion_config.json of a saved model directory, checked for format."""
    path = Path(path)
    cfg_file = path / FUSION_CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path}: no {FUSION_CONFIG_NAME}; expected a directory written by LlamaFusion.save_pretrained "
            "(to start from a plain Llama checkpoint use LlamaFusion.from_llama)"
        )
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_fusion(cls: type[LlamaFusion], path: str | os.PathLike, dtype: torch.dtype | None = None) -> LlamaFusion:
    path = Path(path)
    meta = read_fusion_metadata(path)
    cfg_file = path / FUSION_CONFIG_NAME
    model = cls(
        LlamaArch.from_dict(meta["arch"]),
        meta["separation"],
        ImageConfig(**meta["image"]),
        UNetConfig(**meta["unet"]),
        meta.get("attention", "sdpa"),
        meta.get("routing", "index"),
    )
    try:
        model.diffusion_args = DiffusionArgs(**meta.get("diffusion", {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_file}: 'diffusion': {err}") from err
    prefix = meta.get("document_prefix")
    model.document_prefix = None if prefix is None else [int(i) for i in prefix]
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match {cfg_file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.base_path = meta.get("base_path")
    return model.to(dtype or getattr(torch, meta.get("dtype", "float32")))
