"""Image editing (paper section 5.2): BOI source EOI instruction BOI [target] in one sequence. The source enters
clean (t = 0); the target is diffused on top of the cache of everything before it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.inference.denoise import Generators
from megafusion.inference.images import check_latents, decode_latents
from megafusion.inference.sequence import Item
from megafusion.inference.text_to_image import GeneratedImages, ImageSamplingConfig, sample_images
from megafusion.model import LlamaFusion


def edit_prefix(
    model: LlamaFusion, source: torch.Tensor, instruction_ids: Sequence[int], lead_ids: Sequence[int] = ()
) -> list[Item]:
    """[lead ids] BOI source EOI instruction: the part of an edit sequence before the target's BOI. `lead_ids`
    is what the tokenizer puts before any text (e.g. BOS), so training and inference agree."""
    return [list(lead_ids), [model.boi_id], source, [model.eoi_id], list(instruction_ids)]


@torch.no_grad()
def edit_images(
    model: LlamaFusion,
    tokenizer: TextTokenizer,
    sources: torch.Tensor,
    instructions: str | Sequence[str],
    config: ImageSamplingConfig | None = None,
    generator: Generators = None,
    vae: AutoencoderKL | None = None,
    progress: bool = False,
) -> GeneratedImages:
    """One edited image per (source latent, instruction) pair (one instruction is used for all sources).

    Guidance contrasts with the same sequence without its instruction (BOI source EOI BOI): it strengthens the
    instruction while keeping the source in both branches, as InstructPix2Pix's text guidance does."""
    image = model.image_config
    sources = check_latents(sources, image.latent_channels, image.latent_size)
    if isinstance(instructions, str):
        instructions = [instructions] * sources.shape[0]
    if len(instructions) != sources.shape[0]:
        raise ValueError(f"got {len(instructions)} instructions for {sources.shape[0]} source images")
    lead = list(tokenizer.prefix_ids)
    prefixes, uncond = [], []
    for source, instruction in zip(sources, instructions, strict=True):
        ids = tokenizer.encode(instruction)
        prefixes.append(edit_prefix(model, source, ids, lead))
        uncond.append(edit_prefix(model, source, [], lead))
    latents = sample_images(model, prefixes, uncond, config, generator, progress)
    return GeneratedImages(latents, decode_latents(vae, latents) if vae is not None else None)
