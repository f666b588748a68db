"""Image -> text: [prompt] BOI image EOI read clean (t = 0) into the cache, then text decoding."""

from __future__ import annotations

import torch

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.inference.images import check_latents
from megafusion.inference.sampling import SamplingConfig
from megafusion.inference.sequence import Item, prefill
from megafusion.inference.text import continue_text
from megafusion.inference.tokens import encode_texts, stop_token_ids
from megafusion.model import LlamaFusion


def caption_rows(model: LlamaFusion, latents: torch.Tensor, prompt_ids: list[int] | None = None) -> list[list[Item]]:
    """One row per image: [prompt ids] BOI [image] EOI (the image-first training layout)."""
    image = model.image_config
    latents = check_latents(latents, image.latent_channels, image.latent_size)
    return [[prompt_ids or [], [model.boi_id], latent, [model.eoi_id]] for latent in latents]


@torch.no_grad()
def caption_images(
    model: LlamaFusion,
    tokenizer: TextTokenizer,
    latents: torch.Tensor,
    prompt: str | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Captions for (N, C, H, W) clean latents; greedy by default. `prompt` is plain text placed before the image
    (after the tokenizer's document prefix, e.g. BOS, as every training document starts)."""
    (prompt_ids,) = encode_texts(tokenizer, [prompt if prompt is not None else ""])
    step = prefill(model, caption_rows(model, latents, prompt_ids))
    ids, _ = continue_text(model, step, sampling or SamplingConfig(max_new_tokens=32),
                           stop_token_ids(model, tokenizer), generator)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
