"""Inference: text generation with a KV cache, image generation, captioning, interleaving, editing.

Modules (one job each): `sequence` (rows -> cached prefill), `sampling` (next-token choice), `tokens`
(tokenizer, prompts, stop ids), `text`, `denoise` (schedulers, CFG, the cached denoising loop),
`text_to_image`, `caption`, `interleave`, `edit`, `edit_data` (training format for edit triplets),
`images` (VAE, PNG, grid), `cli`.

Names are imported lazily so `megafusion --help` does not load torch, transformers and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SamplingConfig": "sampling",
    "generate_text": "text",
    "generate_tokens": "text",
    "continue_text": "text",
    "ImageSamplingConfig": "text_to_image",
    "GeneratedImages": "text_to_image",
    "generate_images": "text_to_image",
    "sample_images": "text_to_image",
    "make_scheduler": "denoise",
    "denoise": "denoise",
    "caption_images": "caption",
    "InterleavedOutput": "interleave",
    "generate_interleaved": "interleave",
    "edit_images": "edit",
    "EditTriplet": "edit_data",
    "build_edit_example": "edit_data",
    "collate_edit_examples": "edit_data",
    "edit_diffusion_loss": "edit_data",
    "load_tokenizer": "tokens",
    "load_vae": "images",
    "decode_latents": "images",
    "encode_images": "images",
    "save_images": "images",
    "image_grid": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
