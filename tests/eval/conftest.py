"""Shared fixtures of the eval tests."""

import pytest
import torch

from megafusion.checkpoint.builtin_bases import resolve_base
from megafusion.data_pipeline.tokenizer import load_tokenizer
from megafusion.model import LlamaFusion
from tests.helpers import TINY_IMAGE, TINY_UNET


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised LlamaFusion on the built-in tiny Llama, and its tokenizer."""
    base = resolve_base("builtin:tiny-llama")
    torch.manual_seed(0)
    model = LlamaFusion.from_llama(base, image=TINY_IMAGE, unet=TINY_UNET).eval()
    return model, load_tokenizer(base)
