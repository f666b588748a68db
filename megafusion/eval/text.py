"""Text-side checks: the fused model must behave exactly like its base LM on text (greedy outputs and per-token
log-likelihoods against transformers' LlamaForCausalLM), and perplexity on fixed held-out paragraphs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.inference.sampling import SamplingConfig
from megafusion.inference.text import generate_tokens
from megafusion.inference.tokens import stop_token_ids
from megafusion.model import LlamaFusion

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# fp32 on the same CPU kernels: the text path computes the same ops as transformers up to summation order.
DEFAULT_TOLERANCE = 1e-4
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (1, S) ids -> (1, S, V) logits over the base vocabulary


def load_base_lm(base: str | Path) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM (fp32, eval) from the base HF directory or .gguf file."""
    from transformers import LlamaForCausalLM

    base = Path(base)
    if base.is_file() and base.suffix == ".gguf":
        model = LlamaForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32)
    else:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return model.eval()


def prompt_ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    """A user prompt as the base model expects it: through its chat template when it has one (SmolLM2-Instruct
    answers properly then), else BOS + plain encoding."""
    if tokenizer.chat_template is not None:
        return tokenizer.encode_chat(text)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)


def fused_logits(model: LlamaFusion) -> LogitsFn:
    return lambda ids: model(input_ids=ids).logits


def hf_logits(model: LlamaForCausalLM) -> LogitsFn:
    return lambda ids: model(input_ids=ids).logits


@torch.no_grad()
def token_logprobs(logits_fn: LogitsFn, ids: Sequence[int]) -> torch.Tensor:
    """(len(ids) - 1,) float64 log p(ids[i] | ids[:i]) for i >= 1."""
    x = torch.tensor([list(ids)])
    logp = torch.log_softmax(logits_fn(x)[0, :-1].double(), dim=-1)
    return logp.gather(1, x[0, 1:, None])[:, 0]


@torch.no_grad()
def _hf_greedy(base_lm: LlamaForCausalLM, ids: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    from transformers import GenerationConfig

    # An explicit config: sampling settings a base's generation_config.json might carry must not apply.
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop),
                              pad_token_id=sorted(stop)[0])
    x = torch.tensor([ids])
    out = base_lm.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def text_identity(model: LlamaFusion, base_lm: LlamaForCausalLM, tokenizer: TextTokenizer, prompts: Sequence[list[int]],
                  max_new_tokens: int = 24, tolerance: float = DEFAULT_TOLERANCE,
                  decode: Callable[[list[int]], str] | None = None) -> dict:
    """Greedy continuations of each prompt by the fused model and by the base LM, and the per-token
    log-likelihoods of prompt + base continuation under both. `identical` needs equal greedy ids everywhere
    and log-likelihoods within `tolerance`."""
    stop = stop_token_ids(model, tokenizer)
    decode = decode or tokenizer.decode
    rows, max_diff, greedy_same = [], 0.0, True
    for ids in prompts:
        ours = generate_tokens(model, [[ids]], SamplingConfig(max_new_tokens=max_new_tokens), stop)[0]
        theirs = _hf_greedy(base_lm, ids, max_new_tokens, stop)
        full = list(ids) + theirs
        diff = (token_logprobs(fused_logits(model), full) - token_logprobs(hf_logits(base_lm), full)).abs().max()
        max_diff = max(max_diff, float(diff))
        greedy_same &= ours == theirs
        rows.append({"prompt": decode(list(ids)), "fused": decode([t for t in ours if t not in stop]),
                     "base": decode([t for t in theirs if t not in stop]), "same_tokens": ours == theirs,
                     "max_abs_logprob_diff": float(diff)})
    return {"identical": greedy_same and max_diff <= tolerance, "greedy_identical": greedy_same,
            "max_abs_logprob_diff": max_diff, "tolerance": tolerance, "max_new_tokens": max_new_tokens,
            "prompts": rows}


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, tokenizer: TextTokenizer, paragraphs: Sequence[str], max_len: int = 512) -> float:
    """exp(mean NLL) over every predicted token of BOS + paragraph (each paragraph on its own)."""
    nll, count = 0.0, 0
    for text in paragraphs:
        ids = (([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text))[:max_len]
        logp = token_logprobs(logits_fn, ids)
        nll -= float(logp.sum())
        count += logp.numel()
    return math.exp(nll / count)
