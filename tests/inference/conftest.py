"""Fixtures for inference tests: a tiny random LlamaFusion with a matching word-level tokenizer and VAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from megafusion.data_pipeline.tokenizer import TextTokenizer, load_tokenizer
from megafusion.model import LlamaFusion
from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama
from tests.inference.helpers import save_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """base: HF Llama dir + tokenizer; fused: LlamaFusion.save_pretrained of it; vae: a random AutoencoderKL
    whose latents have the tiny image shape (4 channels, 8x8 px -> 4x4)."""
    root = tmp_path_factory.mktemp("tiny")
    base, fused, vae_dir = root / "base", root / "fused", root / "vae"
    save_tiny_llama(base, "gqa-untied")
    save_tiny_tokenizer(base)
    model = LlamaFusion.from_llama(base, image=TINY_IMAGE, unet=TINY_UNET)
    model.save_pretrained(fused)
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=TINY_IMAGE.latent_channels, norm_num_groups=4,
    ).save_pretrained(vae_dir)
    return {"base": base, "fused": fused, "vae": vae_dir}


@pytest.fixture
def model(tiny_dirs) -> LlamaFusion:
    return LlamaFusion.from_pretrained(tiny_dirs["fused"]).eval()


@pytest.fixture
def tokenizer(tiny_dirs) -> TextTokenizer:
    """Through the one loader training and `generate` use (an HF tokenizer.json here)."""
    return load_tokenizer(tiny_dirs["base"])


@pytest.fixture(autouse=True)
def _one_thread():
    """Decoding runs many small ops (one token, a few image tokens); on a shared 2-core box OpenMP threads
    waiting on each other made them 5-100x slower here (SmolLM2 greedy: 13.5 s -> 3.3 s with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
