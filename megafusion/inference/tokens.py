"""Tokenizer side of inference: loading it next to the model, encoding prompts, stop tokens."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from megafusion.model import LlamaFusion


def load_tokenizer(model: LlamaFusion, path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """AutoTokenizer from `path`, else from the model's base checkpoint (`model.base_path`: an HF dir or .gguf)."""
    source = path if path is not None else model.base_path
    if source is None:
        raise ValueError("the model records no base_path; pass the tokenizer directory explicitly (--tokenizer)")
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return AutoTokenizer.from_pretrained(source)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model: LlamaFusion, tokenizer: PreTrainedTokenizerBase | None = None) -> set[int]:
    """EOS ids of the base config (an int or a list, as Llama 3 has) and of the tokenizer."""
    ids = set(_ids(model.arch.eos_token_id))
    if tokenizer is not None:
        ids.update(_ids(tokenizer.eos_token_id))
    return ids


def use_chat_template(tokenizer: PreTrainedTokenizerBase, chat: bool | None) -> bool:
    """None means: use the chat template when the tokenizer has one."""
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat and not has:
        raise ValueError("the tokenizer has no chat template; run without chat formatting")
    return has if chat is None else chat


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool | None = None) -> list[int]:
    """Ids of a user prompt: through the chat template (as a user turn, ready for the assistant's answer) when
    chat is on, else the tokenizer's plain encoding with its own special tokens."""
    if use_chat_template(tokenizer, chat):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        # The template already wrote any BOS it wants; do not let the tokenizer add another.
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[list[int]]:
    """Plain encodings (caption-style, no chat template): the text before a BOI in training data."""
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def unconditional_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The prompt classifier-free guidance contrasts with: an empty caption (just BOS for tokenizers that add
    one, nothing otherwise), i.e. what a dropped caption looks like."""
    return list(tokenizer("")["input_ids"])
