"""Export the text part of a LlamaFusion model as a plain HF Llama checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from megafusion.checkpoint.names import text_state_dict
from megafusion.common.atomic import atomic_directory
from megafusion.model.fusion import LlamaFusion

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


def export_text_model(model: LlamaFusion, out_dir: str | os.PathLike) -> Path:
    """Writes config.json + model.safetensors that `transformers.LlamaForCausalLM.from_pretrained` loads, plus the
    base model's tokenizer files when the base was an HF directory. Atomic: temp dir renamed into place."""
    with atomic_directory(out_dir) as tmp:
        config = dict(model.arch.hf_config)
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["model_type"] = "llama"
        config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(text_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        base = Path(model.base_path) if model.base_path else None
        if base is not None and base.is_dir():
            for name in TOKENIZER_FILES:
                if (base / name).is_file():
                    shutil.copy2(base / name, tmp / name)
    return Path(out_dir)
