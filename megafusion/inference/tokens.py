"""Tokenizer side of inference: the tokenizer that goes with a model, prompts, stop tokens.

There is one tokenizer type and one loader (`megafusion.data_pipeline.tokenizer`); training packs documents
with the same one, so a prompt encoded here starts exactly like a training document (the tokenizer's
`prefix_ids`: its BOS where it adds one, nothing for SmolLM2)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from megafusion.data_pipeline.tokenizer import TextTokenizer, as_ids, load_tokenizer
from megafusion.model import LlamaFusion


def check_document_prefix(model: LlamaFusion, tokenizer: TextTokenizer, source: object = None) -> None:
    """The tokenizer must start documents the way the model's training documents started (`document_prefix`
    in fusion_config.json; None for models that do not record it, e.g. a base loaded with from_llama)."""
    expected = model.document_prefix
    if expected is not None and list(tokenizer.prefix_ids) != list(expected):
        where = f" {source}" if source is not None else ""
        raise ValueError(
            f"tokenizer{where}: starts documents with {list(tokenizer.prefix_ids)} but the model was trained on "
            f"documents starting with {list(expected)} (document_prefix in its fusion_config.json); "
            "use the tokenizer the model was trained with"
        )


def tokenizer_for(model: LlamaFusion, path: str | os.PathLike | None = None) -> TextTokenizer:
    """The tokenizer at `path` (a directory, tokenizer file or .gguf), else the model's base checkpoint
    (`model.base_path`), checked against the document prefix the model was trained with."""
    source = path if path is not None else model.base_path
    if source is None:
        raise ValueError("the model records no base_path; pass the tokenizer directory explicitly (--tokenizer)")
    tokenizer = load_tokenizer(source)
    check_document_prefix(model, tokenizer, source)
    return tokenizer


def stop_token_ids(model: LlamaFusion, tokenizer: TextTokenizer | None = None) -> set[int]:
    """EOS ids of the base config (an int or a list, as Llama 3 has) and of the tokenizer."""
    ids = set(as_ids(model.arch.eos_token_id))
    if tokenizer is not None:
        ids.update(tokenizer.eos_ids)
    return ids


def use_chat_template(tokenizer: TextTokenizer, chat: bool | None) -> bool:
    """None means: use the chat template when the tokenizer has one."""
    has = tokenizer.chat_template is not None
    if chat and not has:
        raise ValueError("the tokenizer has no chat template; run without chat formatting")
    return has if chat is None else chat


def encode_prompt(tokenizer: TextTokenizer, text: str, chat: bool | None = None) -> list[int]:
    """Ids of a user prompt: through the chat template (as a user turn, ready for the assistant's answer) when
    chat is on, else a document's start: the tokenizer's prefix and the plain encoding."""
    if use_chat_template(tokenizer, chat):
        return tokenizer.encode_chat(text)
    return list(tokenizer.prefix_ids) + tokenizer.encode(text)


def encode_texts(tokenizer: TextTokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Caption-style encodings (no chat template): the text before a BOI in training data, prefix included."""
    return [list(tokenizer.prefix_ids) + tokenizer.encode(t) for t in texts]


def unconditional_ids(tokenizer: TextTokenizer) -> list[int]:
    """The prompt classifier-free guidance contrasts with: an empty caption (just the tokenizer's prefix), i.e.
    what a dropped caption or an image-first document looks like before its BOI."""
    return list(tokenizer.prefix_ids)
