"""Between model latents and pictures: a diffusers AutoencoderKL (optional; loaded with
`megafusion.data_pipeline.vae.load_vae`), PNG files and a grid image.

Model latents live in the VAE's scaled space (training stores `vae.encode(x) * scaling_factor`, minus
`shift_factor` for VAEs that define one), so decoding divides by the scaling factor first."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import make_image_grid
from PIL import Image
from safetensors.torch import load_file, save_file

LATENTS_KEY = "latents"


def _processor(vae: AutoencoderKL) -> VaeImageProcessor:
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return VaeImageProcessor(vae_scale_factor=scale, do_convert_rgb=vae.config.in_channels == 3)


def _shift(vae: AutoencoderKL) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) scaled latents -> N PIL images."""
    param = next(vae.parameters())
    z = latents.to(param.device, param.dtype) / vae.config.scaling_factor + _shift(vae)
    pixels = vae.decode(z).sample
    return _processor(vae).postprocess(pixels.float(), output_type="pil")


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: Sequence[Image.Image], latent_size: int) -> torch.Tensor:
    """PIL images -> (N, C, latent_size, latent_size) scaled latents (the distribution's mode: an input image
    should be read as it is, not resampled)."""
    processor = _processor(vae)
    pixel_size = latent_size * processor.config.vae_scale_factor
    param = next(vae.parameters())
    pixels = processor.preprocess(list(images), height=pixel_size, width=pixel_size).to(param.device, param.dtype)
    z = vae.encode(pixels).latent_dist.mode()
    return (z - _shift(vae)) * vae.config.scaling_factor


def check_latents(latents: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """(C, H, W) or (N, C, H, W) latents of the model's image shape, returned as (N, C, H, W)."""
    if latents.dim() == 3:
        latents = latents[None]
    if latents.dim() != 4 or tuple(latents.shape[1:]) != (channels, size, size):
        raise ValueError(f"latents must have shape (N, {channels}, {size}, {size}), got {tuple(latents.shape)}")
    return latents


def save_latents(latents: torch.Tensor, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({LATENTS_KEY: latents.detach().float().contiguous().cpu()}, str(path))
    return path


def load_latents(path: str | os.PathLike) -> torch.Tensor:
    """Latents written by `save_latents` (a safetensors file with one `latents` tensor)."""
    tensors = load_file(str(path))
    if LATENTS_KEY not in tensors:
        raise ValueError(f"{path}: no {LATENTS_KEY!r} tensor (keys: {sorted(tensors)})")
    return tensors[LATENTS_KEY]


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """All images on one sheet, `cols` per row (default: as square as possible)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    # make_image_grid wants a full grid; pad the last row with blank tiles.
    blank = Image.new(images[0].mode, images[0].size)
    return make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def save_images(images: Sequence[Image.Image], out_dir: str | os.PathLike, prefix: str = "image") -> list[Path]:
    """PNG files <prefix>_000.png, ... and <prefix>_grid.png; returns the per-image paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = out / f"{prefix}_{i:03d}.png"
        im.save(p)
        paths.append(p)
    image_grid(images).save(out / f"{prefix}_grid.png")
    return paths
