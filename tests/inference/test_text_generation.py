"""Text generation with the KV cache against recomputing the whole sequence at every step."""

import torch

from megafusion.inference.sampling import SamplingConfig
from megafusion.inference.sequence import prefill
from megafusion.inference.text import generate_text, generate_tokens
from megafusion.inference.tokens import stop_token_ids
from tests.inference.helpers import VOCAB, force_special_tokens, prompts


def uncached_greedy(model, prompt, n):
    """Reference: the full forward over prompt + generated ids at every step, argmax over the base vocabulary."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached_token_for_token(model):
    rows = prompts((5, 9, 2))
    # One batch of prompts of different lengths: also checks that left padding changes nothing.
    got = generate_tokens(model, [[r] for r in rows], SamplingConfig(max_new_tokens=12))
    for row, ids in zip(rows, got, strict=True):
        assert ids == uncached_greedy(model, row, 12)


def test_stop_token_ends_a_row_and_is_kept(model):
    row = prompts((6,))[0]
    first = uncached_greedy(model, row, 3)
    got = generate_tokens(model, [[row], [row[:3]]], SamplingConfig(max_new_tokens=3), stop_ids={first[1]})
    assert got[0] == first[:2]
    assert len(got[1]) <= 3


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(model):
    rows = [[r] for r in prompts((4, 7))]
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    a = generate_tokens(model, rows, cfg, generator=torch.Generator().manual_seed(3))
    b = generate_tokens(model, rows, cfg, generator=torch.Generator().manual_seed(3))
    c = generate_tokens(model, rows, cfg, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c
    nucleus = SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=1e-6)
    greedy = generate_tokens(model, rows, SamplingConfig(max_new_tokens=8))
    assert generate_tokens(model, rows, nucleus, generator=torch.Generator().manual_seed(0)) == greedy


def test_boi_and_eoi_are_never_emitted_as_text(model, monkeypatch):
    """Even when BOI/EOI dominate the logits, plain text generation masks them."""
    force_special_tokens(model, monkeypatch)
    rows = [[r] for r in prompts((4, 7))]
    with torch.no_grad():
        step = prefill(model, rows)
    assert bool((step.logits.argmax(-1) >= VOCAB).all()), "the guard: BOI/EOI would win unmasked"
    got = generate_tokens(model, rows, SamplingConfig(max_new_tokens=10))
    assert all(0 <= t < VOCAB for row in got for t in row)


def test_generate_text_decodes_with_the_tokenizer(model, tokenizer):
    out = generate_text(model, tokenizer, ["w3 w4 w5", "w9"], SamplingConfig(max_new_tokens=6))
    # A prompt starts like a training document: the tokenizer's prefix (BOS here), then the plain encoding.
    assert tokenizer.prefix_ids + tokenizer.encode("w3 w4 w5") == [1, 3, 4, 5]
    ids = generate_tokens(model, [[[1, 3, 4, 5]], [[1, 9]]], SamplingConfig(max_new_tokens=6),
                          stop_token_ids(model, tokenizer))
    assert out == [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    assert stop_token_ids(model, tokenizer) == {2}


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    from megafusion.inference.tokens import encode_prompt

    assert encode_prompt(tokenizer, "w5 w6") == [1, 5, 6]
    tokenizer.chat_template = "{% for m in messages %}w7 {{ m['content'] }} w8{% endfor %}"
    assert encode_prompt(tokenizer, "w5 w6") == [7, 5, 6, 8]
    assert encode_prompt(tokenizer, "w5 w6", chat=False) == [1, 5, 6]
