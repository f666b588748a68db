"""Autoregressive text generation with the KV cache (greedy or sampled), for one or several prompts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.inference.sampling import SamplingConfig, allowed_token_mask, choose_tokens
from megafusion.inference.sequence import Item, Step, feed_tokens, prefill
from megafusion.inference.tokens import encode_prompt, stop_token_ids
from megafusion.model import LlamaFusion


@torch.no_grad()
def continue_text(
    model: LlamaFusion,
    step: Step,
    sampling: SamplingConfig,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], Step]:
    """Decode from a prefilled `step` until every row has emitted a stop id or max_new_tokens. Returns each
    row's new ids (its stop id included, as transformers does) and the final step. BOI/EOI are never emitted."""
    if step.logits is None:
        raise ValueError("text decoding must start after a text token")
    stop = set(stop_ids)
    allowed = allowed_token_mask(model.arch.vocab_size, allow_boi=False, device=step.logits.device)
    batch = step.cache.batch_size
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for i in range(sampling.max_new_tokens):
        tokens = choose_tokens(step.logits, sampling, allowed, generator)
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop
        if all(done) or i == sampling.max_new_tokens - 1:
            break
        # Finished rows keep being fed (their ids are dropped above) so the batch stays rectangular.
        step = feed_tokens(model, step.cache, tokens[:, None])
    return out, step


@torch.no_grad()
def generate_tokens(
    model: LlamaFusion,
    prompts: Sequence[Sequence[Item]],
    sampling: SamplingConfig | None = None,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids for each prompt row (text ids, optionally with clean images; see `sequence.pack_rows`)."""
    ids, _ = continue_text(model, prefill(model, prompts), sampling or SamplingConfig(), stop_ids, generator)
    return ids


@torch.no_grad()
def generate_text(
    model: LlamaFusion,
    tokenizer: TextTokenizer,
    prompts: str | Sequence[str],
    sampling: SamplingConfig | None = None,
    chat: bool | None = None,
    seed: int | None = None,
) -> list[str]:
    """Text answers to prompts (chat template when the tokenizer has one, unless chat=False)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [[encode_prompt(tokenizer, p, chat)] for p in prompts]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    new_ids = generate_tokens(model, rows, sampling, stop_token_ids(model, tokenizer), generator)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
