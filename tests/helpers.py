"""Shared test helpers: tiny random Llama checkpoints built with transformers (the independent reference)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megafusion.config.schema import ImageConfig, UNetConfig

# Tiny image path used across tests: 4x4x4 latents -> 2x2 = 4 tokens per image.
TINY_IMAGE = ImageConfig(latent_channels=4, latent_size=4, patch_size=2)
TINY_UNET = UNetConfig(channels=16, num_blocks=2, norm_groups=4, time_embed_dim=32)

TINY_LLAMAS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def tiny_llama_config(variant: str = "gqa-untied", **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    kwargs.update(TINY_LLAMAS[variant])
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(path: Path, variant: str = "gqa-untied", seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random HF Llama saved as config.json + safetensors; returns the reference model (fp32, eval)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(variant, **overrides)).eval()
    # Random norm weights, so a norm that is skipped or swapped shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


def mixed_batch(vocab: int, image: ImageConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows: text-BOI-image-EOI-text (caption first) and BOI-image-EOI-caption (image first)."""
    g = torch.Generator().manual_seed(seed)
    n = image.tokens_per_image
    boi, eoi = vocab, vocab + 1
    rows, mods = [], []
    for lead, tail in ((5, 3), (0, 8)):
        ids = torch.randint(0, vocab, (lead,), generator=g).tolist() + [boi] + [0] * n + [eoi]
        ids += torch.randint(0, vocab, (tail,), generator=g).tolist()
        mod = [0] * (lead + 1) + [1] * n + [0] * (1 + tail)
        rows.append(ids)
        mods.append(mod)
    input_ids = torch.tensor(rows)
    modality = torch.tensor(mods)
    images = torch.randn(2, image.latent_channels, image.latent_size, image.latent_size, generator=g)
    return {"input_ids": input_ids, "modality": modality, "images": images, "timesteps": torch.tensor([10, 700])}


def deepspeed_average(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The weight average (train.ema_decay) a DeepSpeed run saved with its step-`step` checkpoint."""
    from safetensors.torch import load_file

    from megafusion.training.run_checkpoints import EMA_FILE

    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / EMA_FILE))
