"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when megafusion.kernels is first imported, which
# any test module may trigger during collection: set it before all of them. CPU-only machines run kernels in the
# interpreter; a CUDA machine (an explicit TRITON_INTERPRET=0) runs them natively.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Converted fp32 HF directory of SmolLM2-135M-Instruct (downloaded and converted once, then cached)."""
    from megafusion.checkpoint.fetch_base import fetch_base

    return fetch_base("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The original Q4_1 GGUF file of SmolLM2-135M-Instruct, from the same cache."""
    from megafusion.checkpoint.fetch_base import fetch_gguf

    return fetch_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf_reference(smollm2_gguf: Path):
    """transformers' own load of the GGUF file (fp32, eval): the independent reference, loaded once (~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
