"""Caption metrics: accuracy (does the caption name the right content?) and CIDEr.

CIDEr is pycocoevalcap's scorer (CIDEr-D, x10 scale, IDF over the evaluated references). Its usual PTB
tokenizer runs a Java program; here captions are tokenized by lower-casing, dropping punctuation and splitting
on whitespace instead, which for these short template-like captions gives the same tokens."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

_PUNCTUATION = re.compile(r"[^\w\s]")


def simple_tokenize(caption: str) -> str:
    """The Java-free stand-in for the PTB tokenizer: lower case, punctuation removed, single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def cider(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-item scores) of one candidate per key against that key's references."""
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(candidates):
        raise ValueError("references and candidates must have the same keys")
    if not candidates:
        raise ValueError("no captions to score")
    keys = sorted(candidates)
    gts = {k: [simple_tokenize(r) for r in references[k]] for k in keys}
    res = {k: [simple_tokenize(candidates[k])] for k in keys}
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def caption_accuracy(captions: Sequence[str], truths: Sequence[object],
                     is_correct: Callable[[str, object], bool]) -> tuple[float, list[bool]]:
    """Fraction of captions that `is_correct(caption, truth)` accepts, and the per-caption verdicts."""
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions but {len(truths)} ground truths")
    if not captions:
        raise ValueError("no captions to score")
    verdicts = [bool(is_correct(c, t)) for c, t in zip(captions, truths, strict=True)]
    return sum(verdicts) / len(verdicts), verdicts
