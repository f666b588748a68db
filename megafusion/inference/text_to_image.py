"""Text -> image: prompt ... BOI run once into the cache, then reverse diffusion of the image chunk."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from PIL import Image

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.inference.denoise import (
    DEFAULT_GUIDANCE,
    Generators,
    SamplerName,
    denoise,
    make_scheduler,
    uses_guidance,
)
from megafusion.inference.images import decode_latents
from megafusion.inference.sequence import Item, prefill
from megafusion.inference.timesteps import DEFAULT_SPACING
from megafusion.inference.tokens import encode_texts, unconditional_ids
from megafusion.model import LlamaFusion


@dataclass
class ImageSamplingConfig:
    sampler: SamplerName = "ddim"
    num_steps: int = 50
    # None turns classifier-free guidance off (no unconditional rows at all).
    guidance_scale: float | None = DEFAULT_GUIDANCE
    timestep_spacing: str = DEFAULT_SPACING
    # The noise process (T, beta schedule) is not a sampling choice: it is the model's `diffusion_args`.


@dataclass
class GeneratedImages:
    latents: torch.Tensor  # (N, C, H, W) in the VAE's scaled space
    images: list[Image.Image] | None  # decoded, when a VAE was given


@torch.no_grad()
def sample_images(
    model: LlamaFusion,
    prefixes: Sequence[Sequence[Item]],
    uncond_prefixes: Sequence[Sequence[Item]] | None,
    config: ImageSamplingConfig | None = None,
    generator: Generators = None,
    progress: bool = False,
    images_per_prefix: int = 1,
) -> torch.Tensor:
    """`images_per_prefix` images after each prefix row (rows are completed with BOI here), in prefix order.
    `uncond_prefixes`: one row shared by all, or one per prefix, for classifier-free guidance. Conditional and
    unconditional rows are prefilled in one forward; every denoising step then reuses those caches."""
    config = config or ImageSamplingConfig()
    boi = [model.boi_id]
    batch = len(prefixes)
    cfg = uses_guidance(uncond_prefixes is not None, config.guidance_scale)
    rows = [[*row, boi] for row in prefixes]
    if cfg:
        if len(uncond_prefixes) not in (1, batch):
            raise ValueError(f"got {len(uncond_prefixes)} unconditional prefixes for {batch} prompts")
        rows += [[*row, boi] for row in uncond_prefixes]
    cache = prefill(model, rows).cache
    repeat = [b for b in range(batch) for _ in range(images_per_prefix)]
    uncond = None
    if cfg:
        uncond = cache.select([batch + (b if len(uncond_prefixes) > 1 else 0) for b in repeat])
    cache = cache.select(repeat)
    scheduler = make_scheduler(config.sampler, config.num_steps, model.diffusion_args, config.timestep_spacing)
    return denoise(model, cache, scheduler, uncond, config.guidance_scale, generator, progress=progress)


@torch.no_grad()
def generate_images(
    model: LlamaFusion,
    tokenizer: TextTokenizer,
    prompts: str | Sequence[str],
    config: ImageSamplingConfig | None = None,
    generator: Generators = None,
    vae: AutoencoderKL | None = None,
    images_per_prompt: int = 1,
    progress: bool = False,
) -> GeneratedImages:
    """Images for caption-style prompts (no chat template: the caption precedes BOI as in training), guided
    against the empty caption. Latents are decoded when a VAE is given."""
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [[ids] for ids in encode_texts(tokenizer, prompts)]
    latents = sample_images(
        model, rows, [[unconditional_ids(tokenizer)]], config, generator, progress, images_per_prompt
    )
    return GeneratedImages(latents, decode_latents(vae, latents) if vae is not None else None)
