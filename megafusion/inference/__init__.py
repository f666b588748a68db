"""Inference: text generation with a KV cache, image generation, captioning, interleaving, editing.

Modules (one job each): `sequence` (rows -> cached prefill), `sampling` (next-token choice), `tokens`
(the model's tokenizer, prompts, stop ids), `text`, `denoise` (schedulers from the model's diffusion settings,
CFG, the cached denoising loop), `text_to_image`, `caption`, `interleave`, `edit`, `images` (latents <-> PIL
images, PNG, grid), `cli`. The tokenizer and VAE loaders are the data pipeline's
(`megafusion.data_pipeline.tokenizer.load_tokenizer`, `megafusion.data_pipeline.vae.load_vae`); the edit
training format is `megafusion.training.edit_objective`.

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
    "tokenizer_for": "tokens",
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
