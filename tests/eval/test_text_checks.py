"""The text-identity check passes an unchanged fused model and flags a changed one; perplexity matches the base."""

import pytest
import torch

from megafusion.checkpoint.builtin_bases import resolve_base
from megafusion.data_pipeline.tokenizer import load_tokenizer
from megafusion.eval.heldout_text import PARAGRAPHS, PROMPTS
from megafusion.eval.text import fused_logits, hf_logits, load_base_lm, perplexity, prompt_ids, text_identity
from megafusion.model import LlamaFusion


@pytest.fixture(scope="module")
def tiny():
    base = resolve_base("builtin:tiny-llama")
    tok = load_tokenizer(base)
    prompts = [prompt_ids(tok, p) for p in PROMPTS[:2]]
    return base, tok, load_base_lm(base), prompts


def test_unchanged_model_is_identical_to_base(tiny):
    base, tok, base_lm, prompts = tiny
    fused = LlamaFusion.from_llama(base, separation="deep").eval()
    with torch.no_grad():  # image-path weights may change freely (as training does): text behaviour must not
        for name, p in fused.named_parameters():
            if LlamaFusion.parameter_group(name) == "image":
                p.add_(torch.randn_like(p) * 0.1)
    result = text_identity(fused, base_lm, tok, prompts, max_new_tokens=8)
    assert result["identical"] and result["greedy_identical"]
    assert result["max_abs_logprob_diff"] <= result["tolerance"]
    assert [row["same_tokens"] for row in result["prompts"]] == [True, True]
    assert perplexity(fused_logits(fused), tok, PARAGRAPHS[:2]) == pytest.approx(
        perplexity(hf_logits(base_lm), tok, PARAGRAPHS[:2]), rel=1e-5)


def test_changed_text_weight_is_flagged(tiny):
    base, tok, base_lm, prompts = tiny
    fused = LlamaFusion.from_llama(base, separation="deep").eval()
    text_params = [p for n, p in fused.named_parameters() if LlamaFusion.parameter_group(n) == "text"]
    with torch.no_grad():
        text_params[-1].mul_(1.5)
    result = text_identity(fused, base_lm, tok, prompts, max_new_tokens=8)
    assert not result["identical"]
    assert result["max_abs_logprob_diff"] > 1e-3
