"""Choosing the next text token from logits: greedy, or temperature + top-p sampling (transformers' warpers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    # 0 means greedy (argmax); otherwise logits are divided by it before top-p sampling.
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def allowed_token_mask(vocab_size: int, allow_boi: bool, device: torch.device | None = None) -> torch.Tensor:
    """(vocab + 2,) bool over [base vocabulary | BOI, EOI]. EOI is never sampled: it is appended after an
    image; BOI only where an image may start (interleaved generation)."""
    allowed = torch.ones(vocab_size + 2, dtype=torch.bool, device=device)
    allowed[vocab_size] = allow_boi
    allowed[vocab_size + 1] = False
    return allowed


def choose_tokens(
    logits: torch.Tensor,
    config: SamplingConfig,
    allowed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) float; returns (B,) token ids."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if config.greedy:
        return logits.argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature)])
    if config.top_p < 1:
        warpers.append(TopPLogitsWarper(config.top_p))
    # The warpers only read the scores; the generated ids they take are not needed for these two.
    scores = warpers(None, logits)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
