"""Image generation and captioning laid out exactly like the training documents, in batches with one seed.

The trainer's packer starts every document with the tokenizer's own prefix (its BOS where it adds one;
nothing for SmolLM2; the model records it as `document_prefix`), and so do the rows here (P = that prefix):
    text -> image   P caption BOI [image]         (unconditional CFG branch: P BOI [image])
    image -> text   P BOI [image] EOI caption EOS
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.inference.caption import caption_rows
from megafusion.inference.sampling import SamplingConfig
from megafusion.inference.sequence import prefill
from megafusion.inference.text import continue_text
from megafusion.inference.text_to_image import ImageSamplingConfig, sample_images
from megafusion.inference.tokens import encode_texts, stop_token_ids, unconditional_ids
from megafusion.model import LlamaFusion


@torch.no_grad()
def generate_latents(model: LlamaFusion, tokenizer: TextTokenizer, prompts: Sequence[str], per_prompt: int,
                     config: ImageSamplingConfig, seed: int = 0, batch_prompts: int = 10,
                     progress: bool = True) -> torch.Tensor:
    """(len(prompts) * per_prompt, C, H, W) latents, grouped by prompt; guided against the empty caption."""
    generator = torch.Generator().manual_seed(seed)
    uncond = [[unconditional_ids(tokenizer)]]  # what an image-first training document looks like before its BOI
    out = []
    chunks = range(0, len(prompts), batch_prompts)
    for start in tqdm(chunks, desc="generate images", unit="batch", disable=not progress or len(chunks) == 1):
        rows = [[ids] for ids in encode_texts(tokenizer, prompts[start : start + batch_prompts])]
        out.append(sample_images(model, rows, uncond, config, generator, progress, per_prompt))
    return torch.cat(out).float()


@torch.no_grad()
def caption_latents(model: LlamaFusion, tokenizer: TextTokenizer, latents: torch.Tensor, max_new_tokens: int = 24,
                    batch_size: int = 64, progress: bool = True) -> list[str]:
    """Greedy captions of clean latents (image-first layout, read at t = 0)."""
    stop = stop_token_ids(model, tokenizer)
    dtype = model.embed_tokens.weight.dtype
    captions: list[str] = []
    for start in tqdm(range(0, len(latents), batch_size), desc="caption images", unit="batch", disable=not progress):
        chunk = latents[start : start + batch_size].to(dtype)
        step = prefill(model, caption_rows(model, chunk, unconditional_ids(tokenizer)))
        ids, _ = continue_text(model, step, SamplingConfig(max_new_tokens=max_new_tokens), stop)
        captions += [tokenizer.decode([t for t in row if t not in stop]).strip() for row in ids]
    return captions
