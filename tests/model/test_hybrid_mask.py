"""The hybrid mask against a brute-force construction written from the rule's definition."""

import pytest
import torch

from megafusion.model.hybrid_mask import HybridMask
from megafusion.model.layout import TokenLayout


def brute_force(modality, doc):
    """Causal within a document, plus full attention among the two tokens of each image."""
    s = len(modality)
    image_of = [-1] * s
    seen = 0
    for i, m in enumerate(modality):
        if m == 1:
            image_of[i] = seen // 2  # two tokens per image in these layouts
            seen += 1
    allowed = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(s):
            if doc[i] != doc[j]:
                continue
            if j <= i or (image_of[i] >= 0 and image_of[i] == image_of[j]):
                allowed[i, j] = True
    return allowed


LAYOUTS = {
    "text-image-text": ([0, 0, 0, 1, 1, 0, 0], [0] * 7),
    "two-images": ([0, 1, 1, 0, 0, 1, 1, 0], [0] * 8),
    "image-first": ([1, 1, 0, 0, 0], [0] * 5),
    "adjacent-images": ([0, 1, 1, 1, 1, 0], [0] * 6),
    "packed-documents": ([0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2]),
    "text-only": ([0] * 6, [0] * 6),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_hybrid_mask_equals_brute_force(name):
    modality, doc = LAYOUTS[name]
    ids = torch.zeros(1, len(modality), dtype=torch.long)
    layout = TokenLayout.build(ids, torch.tensor([modality]), doc_ids=torch.tensor([doc]), tokens_per_image=2)
    mask = HybridMask(layout)
    assert torch.equal(mask.dense()[0], brute_force(modality, doc))


def test_batched_rows_are_independent():
    rows = [LAYOUTS["two-images"], LAYOUTS["packed-documents"]]
    s = max(len(m) for m, _ in rows)
    mods = torch.tensor([m + [0] * (s - len(m)) for m, _ in rows])
    docs = torch.tensor([d + [9] * (s - len(d)) for _, d in rows])
    mask = HybridMask(TokenLayout.build(torch.zeros_like(mods), mods, doc_ids=docs, tokens_per_image=2)).dense()
    for r in range(2):
        assert torch.equal(mask[r], brute_force(mods[r].tolist(), docs[r].tolist()))


def test_positions_restart_per_document_and_images_are_numbered_in_order():
    layout = TokenLayout.build(torch.zeros(1, 8, dtype=torch.long), torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]]),
                               doc_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]), tokens_per_image=2)
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert layout.image_ids.tolist() == [[-1, 0, 0, -1, -1, 1, 1, -1]]


def test_pure_causal_layout_uses_no_mask_tensor():
    layout = TokenLayout.build(torch.zeros(2, 5, dtype=torch.long))
    assert HybridMask(layout).is_causal_only
    packed = TokenLayout.build(torch.zeros(1, 4, dtype=torch.long), doc_ids=torch.tensor([[0, 0, 1, 1]]))
    assert not HybridMask(packed).is_causal_only


def test_bad_layout_is_rejected():
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="modality must hold only"):
        TokenLayout.build(ids, torch.tensor([[0, 2, 0, 0]]))
    with pytest.raises(ValueError, match="image_ids must be >= 0 exactly at image tokens"):
        TokenLayout.build(ids, torch.tensor([[0, 1, 1, 0]]), image_ids=torch.tensor([[0, 0, 0, -1]]))
    with pytest.raises(ValueError, match="runs of image.tokens_per_image=2"):
        TokenLayout.build(ids, torch.tensor([[0, 1, 1, 1]]), tokens_per_image=2)
    with pytest.raises(ValueError, match="adjacent positions in one row"):
        TokenLayout.build(ids, torch.tensor([[1, 0, 1, 0]]), image_ids=torch.tensor([[0, -1, 0, -1]]),
                          tokens_per_image=2)
