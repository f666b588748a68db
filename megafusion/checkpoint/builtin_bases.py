"""Base models a config can name instead of a path: `builtin:tiny-llama` (random, built locally in seconds, for
tests and trying the trainer) and the registry bases of fetch_base (`smollm2-135m`)."""

from __future__ import annotations

from pathlib import Path

import torch

from megafusion.checkpoint.fetch_base import KNOWN_BASES, default_cache_dir, fetch_base
from megafusion.common.atomic import atomic_directory, remove_stale_tmp

BUILTIN_PREFIX = "builtin:"
TINY_LLAMA = dict(
    vocab_size=512,  # byte-level tiktoken: 256 bytes + 256 Llama-3 special tokens
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
)
BUILTINS = {"tiny-llama": TINY_LLAMA}


def _build_random_llama(out: Path, config: dict, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megafusion.data_pipeline.tokenizer import write_byte_level_tiktoken

    torch.manual_seed(seed)
    remove_stale_tmp(out)
    # Every rank of a launch may build it at once: the first complete copy stays (others may be reading it).
    with atomic_directory(out, replace=False, keep_existing=lambda d: (d / "config.json").is_file()) as tmp:
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp, safe_serialization=True)
        write_byte_level_tiktoken(tmp / "tokenizer.model")
    return out


def resolve_base(spec: str, cache_dir: str | Path | None = None) -> Path:
    """A path, `builtin:<name>` or a fetch-base registry name -> an HF Llama directory (or .gguf file)."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ValueError(f"unknown built-in base {spec!r}; known: {[BUILTIN_PREFIX + n for n in BUILTINS]}")
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        out = root / "bases" / f"builtin-{name}"
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            _build_random_llama(out, BUILTINS[name])
        return out
    if spec in KNOWN_BASES:
        return fetch_base(spec, cache_dir=cache_dir)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"model.base {spec!r}: no such path; use an HF Llama directory, a .gguf file, "
            f"{[BUILTIN_PREFIX + n for n in BUILTINS]} or one of {sorted(KNOWN_BASES)}"
        )
    return path
