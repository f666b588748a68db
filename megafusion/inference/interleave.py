"""Interleaved generation: text decoding where the model may emit BOI; the image is then diffused in place on
top of the cache of everything so far, re-read clean (t = 0) with EOI, and text continues after it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from PIL import Image

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.inference.denoise import Generators, denoise, make_scheduler, uses_guidance
from megafusion.inference.images import decode_latents
from megafusion.inference.sampling import SamplingConfig, allowed_token_mask, choose_tokens
from megafusion.inference.sequence import append_clean_image, feed_tokens, prefill
from megafusion.inference.text_to_image import ImageSamplingConfig
from megafusion.inference.tokens import encode_prompt, stop_token_ids, unconditional_ids
from megafusion.model import LlamaFusion


@dataclass
class InterleavedOutput:
    # Text pieces and (C, H, W) image latents, in the order they were generated.
    segments: list[str | torch.Tensor]
    # Every generated id, BOI and EOI included (an image's own tokens are not ids).
    token_ids: list[int]
    images: list[Image.Image] | None = None  # decoded images, when a VAE was given


@torch.no_grad()
def interleave_tokens(
    model: LlamaFusion,
    prompt_ids: Sequence[int],
    uncond_ids: Sequence[int] | None,
    sampling: SamplingConfig,
    image_config: ImageSamplingConfig,
    max_images: int = 1,
    stop_ids: Iterable[int] = (),
    generator: Generators = None,
    progress: bool = False,
) -> list[int | torch.Tensor]:
    """Generated items for one prompt: token ids (BOI/EOI included) and (C, H, W) latents right after each BOI.
    max_new_tokens counts text tokens; at most `max_images` images (BOI is masked afterwards)."""
    stop = set(stop_ids)
    boi, eoi = model.boi_id, model.eoi_id
    step = prefill(model, [[list(prompt_ids)]])
    cfg = uses_guidance(uncond_ids is not None, image_config.guidance_scale)
    # The unconditional prefix never changes: computed once, reused by every image.
    uncond = prefill(model, [[list(uncond_ids), [boi]]]).cache if cfg else None
    scheduler = make_scheduler(image_config.sampler, image_config.num_steps, model.diffusion_args,
                               image_config.timestep_spacing)
    token_generator = generator[0] if isinstance(generator, list) else generator
    items: list[int | torch.Tensor] = []
    num_text = num_images = 0
    while num_text < sampling.max_new_tokens:
        allowed = allowed_token_mask(model.arch.vocab_size, num_images < max_images, step.logits.device)
        token = int(choose_tokens(step.logits, sampling, allowed, token_generator)[0])
        items.append(token)
        if token == boi:
            step = feed_tokens(model, step.cache, torch.tensor([[boi]], device=step.logits.device))
            latents = denoise(model, step.cache, scheduler, uncond, image_config.guidance_scale, generator,
                              progress=progress)
            # The finished image enters the context clean, as an input image would, followed by EOI.
            step = append_clean_image(model, step.cache, latents, then=[eoi])
            items += [latents[0], eoi]
            num_images += 1
            continue
        num_text += 1
        if token in stop or num_text == sampling.max_new_tokens:
            break
        step = feed_tokens(model, step.cache, torch.tensor([[token]], device=step.logits.device))
    return items


@torch.no_grad()
def generate_interleaved(
    model: LlamaFusion,
    tokenizer: TextTokenizer,
    prompt: str,
    sampling: SamplingConfig | None = None,
    image_config: ImageSamplingConfig | None = None,
    max_images: int = 1,
    chat: bool | None = None,
    generator: Generators = None,
    vae: AutoencoderKL | None = None,
    progress: bool = False,
) -> InterleavedOutput:
    """Text and images for one prompt (chat template when the tokenizer has one, unless chat=False)."""
    items = interleave_tokens(
        model, encode_prompt(tokenizer, prompt, chat), unconditional_ids(tokenizer),
        sampling or SamplingConfig(), image_config or ImageSamplingConfig(), max_images,
        stop_token_ids(model, tokenizer), generator, progress,
    )
    segments: list[str | torch.Tensor] = []
    text: list[int] = []
    special = {model.boi_id, model.eoi_id}
    for item in items:
        if isinstance(item, torch.Tensor):
            if text:
                segments.append(tokenizer.decode(text, skip_special_tokens=True))
                text = []
            segments.append(item)
        elif item not in special:
            text.append(item)
    if text:
        segments.append(tokenizer.decode(text, skip_special_tokens=True))
    latents = [s for s in segments if isinstance(s, torch.Tensor)]
    images = decode_latents(vae, torch.stack(latents)) if vae is not None and latents else None
    token_ids = [i for i in items if isinstance(i, int)]
    return InterleavedOutput(segments, token_ids, images)
