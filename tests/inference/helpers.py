"""Helpers for inference tests: a word-level tokenizer for the tiny Llama, prompts, biased special logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from megafusion.model import LlamaFusion

VOCAB = 97  # tests.helpers' tiny Llama; ids 0/1/2 = unk/bos/eos as in LlamaConfig's defaults


def save_tiny_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny vocabulary: words w3 ... w96, a BOS added in front like Llama's."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def force_special_tokens(model: LlamaFusion, monkeypatch: pytest.MonkeyPatch, boi: float = 1e4, eoi: float = 1e4):
    """Make BOI/EOI the top logits everywhere, to see what the generators let through."""
    original = model.lm_logits

    def biased(hidden):
        logits, special = original(hidden)
        return logits, special + torch.tensor([boi, eoi], dtype=special.dtype)

    monkeypatch.setattr(model, "lm_logits", biased)


def prompts(lengths: tuple[int, ...] = (5, 9, 2), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in lengths]
