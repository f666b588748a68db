"""Dequantize a llama-architecture GGUF file into an HF-style config dict and state dict.

The heavy lifting (tensor-name mapping, the q/k head permutation llama.cpp applies, dequantization)
is delegated to transformers' own GGUF loader so our names and layouts match what
`LlamaForCausalLM` expects exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)


def gguf_architecture(path: str | Path) -> str:
    """Return `general.architecture` of a GGUF file, raising ValueError if it is not a readable GGUF file."""
    path = Path(path)
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")

    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors on truncated/corrupt files
        raise ValueError(f"{path} looks like GGUF but could not be parsed: {exc}") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path} has no general.architecture metadata")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _check_supported(path: Path) -> None:
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path} has GGUF architecture {arch!r}; only {', '.join(SUPPORTED_ARCHITECTURES)} is supported"
        )


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load a llama GGUF file as `(hf_config_dict, state_dict)` with dequantized HF-named tensors.

    The config dict is `LlamaConfig.to_dict()` without `quantization_config`, so it can be written as a
    plain (non-quantized) checkpoint config. With tied embeddings only `model.embed_tokens.weight` is
    returned, never `lm_head.weight`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    _check_supported(path)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = model.config.to_dict()
    # transformers marks the config as gguf-quantized even though the weights are already dequantized;
    # keeping it would make the written checkpoint un-loadable without the original .gguf.
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]

    tied = bool(config.get("tie_word_embeddings", False))
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        state_dict[name] = tensor.detach().to(dtype).contiguous()
    return config, state_dict
